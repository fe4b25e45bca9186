"""API keys: `Authorization: Bearer <secret>` when keys are configured; open otherwise.

A job, dataset or verification belongs to the key name that created it. Other keys get 404
for it (not 403: they must not learn it exists); admin keys see everything. Key secrets are
compared in constant time and never stored, logged or returned: only the key's name is.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import HTTPException, Request, status

from app.settings import ApiKey

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool

    def owner_filter(self) -> str | None:
        """The owner to filter listings by; None (everyone) for an admin."""
        return None if self.admin else self.name

    def may_see(self, owner: str) -> bool:
        return self.admin or owner == self.name


def authenticate(request: Request, keys: list[ApiKey]) -> Principal:
    if not keys:
        return Principal(ANONYMOUS, admin=True)
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    secret = secret.strip().encode()
    found = None
    for key in keys:  # no early exit, so timing does not tell which key matched
        if hmac.compare_digest(key.secret.encode(), secret):
            found = key
    if found is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )
    return Principal(found.name, admin=found.admin)
