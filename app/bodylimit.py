"""Request bodies past a size limit are refused as every other bad request is: a JSON 413
whose detail says which limit, whether the client declared the size (Content-Length) or
streamed it. (FastAPI's own limit answers a declared size in plain text "Content Too Large".)"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def too_large(what: str, limit: int) -> str:
    """The one wording of every size refusal (this middleware's and the upload's own check)."""
    return f"{what}: larger than the limit of {limit} bytes"


@dataclass(frozen=True)
class Limit:
    size: int  # bytes of body allowed
    detail: str  # what the 413 says


class BodyLimit:
    """routes: (method, path) -> its own limit; every other request gets default."""

    def __init__(self, app: ASGIApp, default: Limit, routes: dict[tuple[str, str], Limit]) -> None:
        self.app, self.default, self.routes = app, default, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.routes.get((scope["method"], scope["path"].rstrip("/")), self.default)
        declared = _content_length(scope)
        if declared is not None and declared > limit.size:  # refused before a byte is read
            await JSONResponse({"detail": limit.detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.size:
                    # raised where the route reads its body: FastAPI's handler answers it
                    raise HTTPException(413, limit.detail)
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
