"""Every error leaves the server as {"error": {"type", "message", "field"}} (schemas.error_body) with a 4xx/5xx
status: one table maps each exception to its status, type and field."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapter_store import (
    BrokenCompositionError,
    BrokenTaskError,
    InventoryError,
    MixError,
    StoreWriteError,
    TaskConflictError,
    TaskNameError,
    UnknownTaskError,
)

from .adapt import JobConflictError, QueueFull
from .admission import ClientGone, Overloaded
from .engine import KVCapacityError, ShuttingDown
from .limits import BodyTooLarge
from .schemas import error_body

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raised by routes for a request the server refuses: status, type, message, and the field at fault."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        self.status = status
        self.type = type_
        self.message = message
        self.field = field
        self.headers = headers
        super().__init__(message)


def _api_error(exc: ApiError) -> ApiError:
    return exc


# exception -> ApiError with its status, type, message and field
TRANSLATIONS: dict[type[BaseException], Callable[..., ApiError]] = {
    ApiError: _api_error,
    UnknownTaskError: lambda e: ApiError(404, "unknown_task", f"unknown task {e.name!r}; GET /tasks lists the tasks",
                                         "task"),
    TaskConflictError: lambda e: ApiError(409, "conflict", str(e), "task"),
    BrokenCompositionError: lambda e: ApiError(409, "broken_composition", str(e), "task"),
    BrokenTaskError: lambda e: ApiError(409, "broken_task", str(e), "task"),
    StoreWriteError: lambda e: ApiError(507, "storage_full", str(e)) if e.disk_full
    else ApiError(503, "storage_unavailable", str(e), headers={"Retry-After": "30"}),
    MixError: lambda e: ApiError(422, "validation_error", f"{e.field}: {e}", e.field),
    JobConflictError: lambda e: ApiError(409, "conflict", str(e), e.field),
    TaskNameError: lambda e: ApiError(422, "validation_error", f"task: {e}", "task"),
    Overloaded: lambda e: ApiError(503, "overloaded", str(e), headers={"Retry-After": str(e.retry_after)}),
    QueueFull: lambda e: ApiError(503, "overloaded", str(e), headers={"Retry-After": "10"}),
    ShuttingDown: lambda e: ApiError(503, "unavailable", str(e), headers={"Retry-After": "5"}),
    BodyTooLarge: lambda e: ApiError(413, "too_large", f"request body over {e.max_bytes} bytes", "body"),
    InventoryError: lambda e: ApiError(500, "inventory_error", str(e)),
    ClientGone: lambda e: ApiError(499, "client_closed", "the client closed the connection"),
    KVCapacityError: lambda e: ApiError(413, "too_large", str(e), e.field),
}


def as_api_error(exc: BaseException) -> ApiError:
    for kind in type(exc).__mro__:
        if kind in TRANSLATIONS:
            return TRANSLATIONS[kind](exc)
    return ApiError(500, "internal_error", f"internal error ({type(exc).__name__})")


def error_type(exc: BaseException) -> str:
    """The `type` an exception has in error bodies (also for errors reported inside an event stream)."""
    return as_api_error(exc).type


def error_response(status: int, type_: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(type_, message, field), status_code=status, headers=headers)


_MEMBER_NAMES = ("str", "int", "float", "bool", "list", "dict")  # pydantic's names of a union's members in a loc


def _field_of(loc: tuple) -> str:
    """The field a validation error's loc points at, without pydantic's union member names ("constrained-str",
    "list[int]", …): `prompt`, `prompt.1`, `messages.0.role`."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path") and not _member_name(p)]
    return ".".join(parts) or "body"


def _member_name(part) -> bool:
    return isinstance(part, str) and (part in _MEMBER_NAMES or "[" in part or "-" in part)


async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = _field_of(tuple(first.get("loc", ())))
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return error_response(422, "validation_error", f"{field}: {first.get('msg')}{more}", field)


async def _translated(_: Request, exc: Exception) -> JSONResponse:
    error = as_api_error(exc)
    if error.status >= 500 and error.type not in ("unavailable", "overloaded"):
        log.error("%s: %s", error.type, exc, exc_info=error.type == "internal_error")
    return error_response(error.status, error.type, error.message, error.field, error.headers)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI wraps errors while reading the body in a 400
        return await _translated(request, exc.__cause__)
    return error_response(exc.status_code, "http_error", str(exc.detail), headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    for exc_type in (*TRANSLATIONS, Exception):
        app.add_exception_handler(exc_type, _translated)
