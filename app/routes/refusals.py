"""The refusals a route can answer, for its OpenAPI description: `{"detail": "<message>"}`
with the status's meaning here (422s are FastAPI's own, described already)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Detail(BaseModel):
    detail: str


MEANING = {
    400: "the body cannot be parsed at all (not UTF-8 text, or broken multipart data)",
    401: "missing or wrong API key (only when the box has keys)",
    403: "the key is not an admin key",
    404: "no such job (or it belongs to another key)",
    409: "the job is not in a state that allows this",
    410: "the files are gone from the server's disk",
    413: "the body is larger than its limit",
    429: "this key has too many queued or running jobs (see Retry-After)",
}


def refusals(*codes: int, **meanings: str) -> dict[int | str, dict[str, Any]]:
    """responses= for a route or router; meanings: code_NNN="what it means on this route"."""
    return {code: {"model": Detail, "description": meanings.get(f"code_{code}", MEANING[code])}
            for code in codes}
