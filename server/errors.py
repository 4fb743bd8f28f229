"""Every error leaves the server as {"error": {"type", "message", "field"}} with a 4xx/5xx status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapter_store import InventoryError, TaskConflictError, TaskNameError, UnknownTaskError

from .batcher import Overloaded, ShuttingDown
from .limits import BodyTooLarge

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raised by routes for a request the server refuses: status, type, message, and the field at fault."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        self.status, self.type, self.message, self.field, self.headers = status, type_, message, field, headers
        super().__init__(message)


def error_type(exc: BaseException) -> str:
    """The `type` an exception has in error bodies (also for errors reported inside an event stream)."""
    return {UnknownTaskError: "unknown_task", TaskConflictError: "conflict", TaskNameError: "validation_error",
            Overloaded: "overloaded", ShuttingDown: "unavailable", InventoryError: "inventory_error"}.get(
        type(exc), exc.type if isinstance(exc, ApiError) else "internal_error")


def error_response(status: int, type_: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"type": type_, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers)


def _field_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = _field_of(tuple(first.get("loc", ())))
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return error_response(422, "validation_error", f"{field}: {first.get('msg')}{more}", field)


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.type, exc.message, exc.field, exc.headers)


async def _unknown_task(_: Request, exc: UnknownTaskError) -> JSONResponse:
    return error_response(404, "unknown_task", f"unknown task {exc.name!r}; GET /tasks lists the tasks", "task")


async def _conflict(_: Request, exc: TaskConflictError) -> JSONResponse:
    return error_response(409, "conflict", str(exc), "task")


async def _bad_name(_: Request, exc: TaskNameError) -> JSONResponse:
    return error_response(422, "validation_error", f"task: {exc}", "task")


async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
    return error_response(503, "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after)})


async def _shutting_down(_: Request, exc: ShuttingDown) -> JSONResponse:
    return error_response(503, "unavailable", str(exc), headers={"Retry-After": "5"})


async def _inventory(_: Request, exc: InventoryError) -> JSONResponse:
    log.error("inventory error while serving: %s", exc)
    return error_response(500, "inventory_error", str(exc))


async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
    return error_response(413, "too_large", str(exc), "body")


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI wraps errors while reading the body in a 400
        return await _too_large(request, exc.__cause__)
    return error_response(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return error_response(500, "internal_error", f"internal error ({type(exc).__name__})")


def install_error_handlers(app: FastAPI) -> None:
    for exc_type, handler in [
        (RequestValidationError, _validation), (ApiError, _api_error), (UnknownTaskError, _unknown_task),
        (TaskConflictError, _conflict), (TaskNameError, _bad_name), (Overloaded, _overloaded),
        (ShuttingDown, _shutting_down), (BodyTooLarge, _too_large), (InventoryError, _inventory),
        (StarletteHTTPException, _http), (Exception, _unexpected),
    ]:
        app.add_exception_handler(exc_type, handler)
