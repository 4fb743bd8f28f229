"""Request body cap: 413 for bodies over `max_bytes`, by Content-Length or while the body streams in."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .schemas import error_body


class BodyTooLarge(Exception):
    """Raised while reading a streamed body past the cap; the app's handler turns it into a 413."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        super().__init__(f"request body over {max_bytes} bytes")


class BodySizeLimit:

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _too_large(send, self.max_bytes)
            return
        seen = [0]

        async def counting_receive() -> Message:
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)


async def _too_large(send: Send, max_bytes: int) -> None:
    body = json.dumps(error_body("too_large", f"request body over {max_bytes} bytes", "body")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
