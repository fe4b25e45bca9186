"""Whether the Hugging Face hub answers, asked once per process with a short timeout.

huggingface_hub retries a request that cannot connect five times with back-off (about 30 s
for a model's first file) and logs the retries where the user of a job never sees them. One
request with a 3-second timeout answers the same question first. When the hub does not answer,
the process goes offline (HF_HUB_OFFLINE for huggingface_hub, transformers and datasets): what
the hub cache holds still loads, anything else fails at once with a message that says the hub
could not be reached.
"""

from __future__ import annotations

import functools
import os
import sys

import httpx

PROBE_TIMEOUT_S = 3.0


@functools.cache
def unreachable() -> str | None:
    """Why the hub could not be reached; None when it answers (any HTTP status) or when the
    user chose offline mode. Probed once; an unreachable hub turns offline mode on."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        httpx.head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        _go_offline()
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def offline() -> bool:
    """Whether hub files come from the cache only (chosen, or after a failed probe)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def why_offline() -> str:
    """The reason hub files could not be fetched, for an error message."""
    from huggingface_hub import constants

    reason = unreachable()
    if reason:
        return f"the hub ({constants.ENDPOINT}) could not be reached ({reason})"
    if offline():
        return "the hub is not used here (HF_HUB_OFFLINE is set)"
    return f"the hub ({constants.ENDPOINT}) answered but did not serve it"


def _go_offline() -> None:
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries imported later (datasets reads it then)
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
