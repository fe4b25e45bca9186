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


# around the header value only ASCII space and tab are whitespace (RFC 9110 OWS); str.strip()
# would also take Unicode spaces (U+00A0, U+0085) off a secret that does not end in them
_OWS = " \t"


def bearer_secret(header: str) -> bytes | None:
    """The secret of `Authorization: Bearer <secret>` as the client sent its bytes, or None.
    Starlette decodes header bytes as latin-1, so encoding back gives them unchanged."""
    scheme, _, secret = header.strip(_OWS).partition(" ")
    secret = secret.strip(_OWS)
    if scheme.lower() != "bearer" or not secret:
        return None
    return secret.encode("latin-1")


def authenticate(request: Request, keys: list[ApiKey]) -> Principal:
    if not keys:
        return Principal(ANONYMOUS, admin=True)
    secret = bearer_secret(request.headers.get("authorization", ""))
    if secret is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    found = None
    for key in keys:  # no early exit, so timing does not tell which key matched
        if hmac.compare_digest(key.secret.encode(), secret):
            found = key
    if found is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )
    return Principal(found.name, admin=found.admin)


def require_admin(principal: Principal, what: str) -> None:
    """403 for a key that is not an admin's (an open box's caller is one)."""
    if not principal.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{what} needs an admin key")
