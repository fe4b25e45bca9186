"""Third-party log noise that nobody running gptqd can act on, kept out of what our commands
print: torchao logs every optional kernel this machine cannot load, and torch's pytree logs a
deprecation of torchao's own, each time transformers imports them. Errors still show."""

from __future__ import annotations

import logging

NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_third_party() -> None:
    """Only errors from the NOISY_LOGGERS (call before torch and transformers are imported,
    or after: a level set on these loggers is not reset by torch's logging set-up)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
