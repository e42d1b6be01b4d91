"""The request body limit of `bgq api` (BGQ_MAX_UPLOAD_MB), enforced before a route reads it."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.api.errors import BodyTooLarge, error_response

Responder = Callable[[str], JSONResponse]  # a 413 message -> the answer for a route


class BodyLimit:
    """Refuse request bodies over the limit: by Content-Length at once, else while reading."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, responders: Mapping[str, Responder] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.responders = dict(responders or {})  # by path prefix; bgq's 413 elsewhere

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                response = self.too_large_response(scope["path"])
                await response(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(too_large(self.max_bytes))
            return message

        await self.app(scope, limited, send)

    def too_large_response(self, path: str) -> JSONResponse:
        """The 413, or the answer of the responder whose prefix `path` starts with."""
        for prefix, responder in self.responders.items():
            if path.startswith(prefix):
                return responder(too_large(self.max_bytes))
        return error_response(413, "payload_too_large", too_large(self.max_bytes))


def too_large(max_bytes: int) -> str:
    """The 413's message: the limit in MiB, as BGQ_MAX_UPLOAD_MB sets it."""
    return f"request body over the BGQ_MAX_UPLOAD_MB limit of {max_bytes / 2**20:g} MiB"
