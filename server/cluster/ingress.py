"""The ingress: receives every HTTP request (behind Ray Serve's proxy), reads its body, names its task (routing.py)
and relays it to an engine replica through a DeploymentHandle with `multiplexed_model_id=task`, so Ray Serve sends it
to a replica where the task's adapter is resident; the replica's answer streams back as it comes (SSE included).

A replica that dies (kill -9, machine gone) before the client got a byte: an idempotent request is sent again
(Ray Serve routes around the dead replica and starts a new one), any other gets 503. After the first byte, a stream
ends with an in-band error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from ray import serve
from ray.exceptions import RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..limits import BodyTooLarge
from ..schemas import error_body
from ..sse import event
from .relay import RelayedRequest, ResponseStart
from .routing import idempotent, model_id

log = logging.getLogger(__name__)
REPLICA_GONE = (RayActorError, WorkerCrashedError, ReplicaUnavailableError, DeploymentUnavailableError)
RETRY_DELAYS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 4.0)  # ~20 s: a replacement starts
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@serve.deployment(name="Ingress", max_ongoing_requests=1024)
@serve.ingress()
class Ingress:
    def __init__(self, replicas: DeploymentHandle, max_body_bytes: int):
        self.replicas = replicas
        self.max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.relay, methods=METHODS)])

    async def relay(self, request: Request) -> Response:
        try:
            body = await _read_body(request, self.max_body_bytes)
        except BodyTooLarge as exc:
            return JSONResponse(error_body("too_large", str(exc), "body"), status_code=413)
        relayed = RelayedRequest.of(request.scope, body)
        task = model_id(relayed.method, relayed.path, body)
        try:
            start, first, rest = await self._open(relayed, task, retry=idempotent(relayed.method, relayed.path))
        except BackPressureError as exc:
            return _unavailable(f"every replica is busy ({exc.message})")
        except Exception as exc:
            if _replica_gone(exc):
                return _unavailable("no replica could answer; retry later" if idempotent(relayed.method, relayed.path)
                                    else "the replica handling this request stopped; it may or may not have taken "
                                    "effect")
            log.exception("%s %s: relaying failed", relayed.method, relayed.path)
            return JSONResponse(error_body("internal_error", "internal error (relaying to a replica)"), 500)
        response = StreamingResponse(_chain(first, rest, start), status_code=start.status)
        response.raw_headers = list(start.headers)
        return response

    async def _open(self, request: RelayedRequest, task: str, *, retry: bool
                    ) -> tuple[ResponseStart, bytes, DeploymentResponseGenerator]:
        """The replica's response start and first body chunk (nothing reaches the client before both, so a replica
        dying before then costs an idempotent request only a retry), and the rest of its stream."""
        handle = self.replicas.options(stream=True, method_name="handle")
        if task:
            handle = handle.options(multiplexed_model_id=task)
        for delay in (*RETRY_DELAYS_S, None):
            stream = handle.remote(request)
            try:
                start = await stream.__anext__()
                first = await anext(stream, b"")
                return start, first, stream
            except BaseException as exc:  # the replica died, or refused; or the client went away (cancelled)
                stream.cancel()
                if not (retry and delay is not None and _replica_gone(exc)):
                    raise
                log.warning("%s %s: replica gone (%s); sending it again in %.2f s", request.method, request.path,
                            type(exc).__name__, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")


async def _chain(first: bytes, rest: DeploymentResponseGenerator, start: ResponseStart) -> AsyncIterator[bytes]:
    try:
        if first:
            yield first
        async for chunk in rest:
            yield chunk
    except Exception as exc:
        if not _replica_gone(exc):
            raise
        log.warning("a replica stopped in the middle of a response")
        if (start.header(b"content-type") or b"").startswith(b"text/event-stream"):
            yield event(error_body("unavailable", "the replica serving this stream stopped; send the request "
                                   "again"), name="error").encode()
    finally:
        rest.cancel()  # the client went away (or the stream ended: then a no-op)


def _replica_gone(exc: BaseException) -> bool:
    """The replica died or cannot be reached (also when Ray reports it as the cause of a task's error)."""
    return isinstance(exc, REPLICA_GONE) or isinstance(getattr(exc, "cause", None), REPLICA_GONE)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise BodyTooLarge(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _unavailable(message: str) -> Response:
    return Response(json.dumps(error_body("unavailable", message)), status_code=503,
                    media_type="application/json", headers={"Retry-After": "1"})
