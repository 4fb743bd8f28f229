"""One HTTP request carried to another process and run there through an ASGI app, its response carried back as
a start (status, headers) and body chunks. Ray-free: the ingress and the replicas pass these through Ray Serve.

    request = RelayedRequest.of(scope, body)                  # the ingress: what the client sent, body whole
    async for item in serve_asgi(app, request): ...           # the replica: ResponseStart, then bytes, ...
The app sees a client that stays connected; leaving the iteration early (the client went away) cancels the app's
handling of the request, which retires its rows (as a disconnect does in one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Scope

from ..schemas import error_body

Headers = tuple[tuple[bytes, bytes], ...]
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade", b"proxy-connection"}
# what a replica adds to every response
REPLICA_HEADER = b"x-mhr-replica"  # which replica answered (its Ray Serve id)
PID_HEADER = b"x-mhr-replica-pid"  # its process, for operators (and the kill -9 test)
RESIDENT_HEADER = b"x-mhr-resident"  # whether the task's adapter was resident there when the request arrived
FINISH_AFTER_RESPONSE_S = 1.0  # the app's own bookkeeping after its last byte (metrics) gets this long


@dataclass(frozen=True)
class RelayedRequest:
    method: str
    path: str
    query_string: bytes
    headers: Headers
    body: bytes
    client: tuple[str, int] | None = None
    scheme: str = "http"

    @classmethod
    def of(cls, scope: Scope, body: bytes) -> RelayedRequest:
        headers = tuple((k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP)
        client = tuple(scope["client"]) if scope.get("client") else None
        return cls(scope["method"], scope["path"], scope.get("query_string", b""), headers, body, client,
                   scope.get("scheme", "http"))

    def scope(self) -> Scope:
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": self.scheme, "path": self.path, "raw_path": self.path.encode(),
                "root_path": "", "query_string": self.query_string, "headers": list(self.headers),
                "client": self.client, "server": None, "state": {}}


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: Headers

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


async def serve_asgi(app: ASGIApp, request: RelayedRequest, extra_headers: Sequence[tuple[bytes, bytes]] = ()
                     ) -> AsyncIterator[ResponseStart | bytes]:
    """Run the request through the app in this process: yield its ResponseStart (with extra_headers added), then
    each non-empty body chunk as the app sends it."""
    outbox: asyncio.Queue[Message | BaseException] = asyncio.Queue()
    body = [{"type": "http.request", "body": request.body, "more_body": False}]

    async def receive() -> Message:
        if body:
            return body.pop()
        await asyncio.get_running_loop().create_future()  # never resolves: the app is cancelled instead
        raise AssertionError("unreachable")

    async def run() -> None:
        try:
            await app(request.scope(), receive, outbox.put)
        except Exception as exc:  # the app's error handlers answered already, or the answer is a 500 below
            await outbox.put(exc)

    task = asyncio.create_task(run())
    started = finished = False
    try:
        while not finished:
            message = await _next(outbox, task)
            if isinstance(message, BaseException) or message is None:
                if not started:
                    yield _internal_error_start()
                    yield _internal_error_body()
                return
            if message["type"] == "http.response.start":
                started = True
                yield ResponseStart(message["status"], (*_headers(message), *extra_headers))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                finished = not message.get("more_body", False)
    finally:
        if finished:
            await asyncio.wait({task}, timeout=FINISH_AFTER_RESPONSE_S)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _next(outbox: asyncio.Queue, task: asyncio.Task) -> Message | BaseException | None:
    """The app's next message, or None if the app returned without sending one."""
    getter = asyncio.ensure_future(outbox.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    return outbox.get_nowait() if not outbox.empty() else None


def _headers(message: Message) -> Headers:
    return tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ()))


def _internal_error_start() -> ResponseStart:
    return ResponseStart(500, ((b"content-type", b"application/json"),))


def _internal_error_body() -> bytes:
    return json.dumps(error_body("internal_error", "internal error (the app ended without an answer)")).encode()
