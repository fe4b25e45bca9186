"""Uvicorn's access log without secrets.

A client may put its API key in the URL (`?api_key=...`): the request is refused (keys are read
from the Authorization header only), but uvicorn's access log would still write the URL. The
filter below is installed on uvicorn's access logger by create_app, so it holds however the
server is started (`gptqd serve`, the uvicorn command, the service tests): every query string
is replaced whole, since any of its names or values may be a secret, and a configured key's
secret is masked wherever else it appears in the line (a key pasted into the path).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from urllib.parse import quote

ACCESS_LOGGER = "uvicorn.access"
REDACTED = "[redacted]"


def redact_query(target: str) -> str:
    """A request target with its query string, if any, replaced."""
    path, sep, _query = target.partition("?")
    return f"{path}?{REDACTED}" if sep else target


def redact_secrets(text: str, secrets: Iterable[str]) -> str:
    """text with every secret masked, as written or percent-encoded (uvicorn quotes paths)."""
    for secret in secrets:
        for form in {secret, quote(secret)}:
            text = text.replace(form, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites the string arguments of each access log record before it is formatted."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # longest first, so a secret that contains another is masked whole
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def clean(self, value: object) -> object:
        if not isinstance(value, str):
            return value
        return redact_secrets(redact_query(value), self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(self.clean(arg) for arg in record.args)
        else:  # a message formatted before logging
            record.msg = self.clean(record.msg)
        return True


def install(secrets: Iterable[str]) -> None:
    """Puts one RedactingFilter (replacing an earlier app's) on uvicorn's access logger."""
    logger = logging.getLogger(ACCESS_LOGGER)
    for old in [f for f in logger.filters if isinstance(f, RedactingFilter)]:
        logger.removeFilter(old)
    logger.addFilter(RedactingFilter(secrets))
