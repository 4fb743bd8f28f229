"""The client's exceptions: one tree under MhrError, and the one function that maps an error response.

    MhrError
    ├── TransportError            the server could not be reached, timed out, or a stream broke off
    ├── ExportError               an exported archive is not a zip or would write outside its folder
    ├── WaitTimeout               wait() ran past its timeout (also a TimeoutError)
    └── ApiError                  the server answered 4xx/5xx: .status, .type, .message, .field
        ├── BadRequest            400, 413
        │   └── ValidationError   422 (.field names the field at fault, e.g. "max_new_tokens")
        ├── Unauthorized          401 (no API key)
        ├── Forbidden             403 (wrong API key)
        ├── NotFound              404
        │   └── UnknownTask       404 with type "unknown_task"
        ├── Conflict              409
        │   └── BrokenTask        409 with type "broken_task": the task's file on the server is unusable
        ├── Overloaded            503 (.retry_after: seconds from the Retry-After header, or None)
        └── ServerError           other 5xx
            └── StorageError      507 "storage_full", 503 "storage_unavailable": the server cannot write
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx


class MhrError(Exception):
    """Base class of every exception the client raises."""


class TransportError(MhrError):
    """No (complete) answer from the server: connection refused or dropped, timeout, broken stream."""


class ExportError(MhrError):
    """An exported LoRA archive is not a valid zip, or an entry would land outside the destination."""


class WaitTimeout(MhrError, TimeoutError):
    """``wait()`` gave up before the job ended; ``.job`` is the last state seen."""

    def __init__(self, message: str, job: Any = None):
        super().__init__(message)
        self.job = job


class ApiError(MhrError):
    """The server refused the request: HTTP ``status``, error ``type``, ``message`` and the ``field`` at fault."""

    def __init__(self, status: int, type: str, message: str, field: str | None = None):  # noqa: A002
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type, message, field

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, type={self.type!r}, message={self.message!r}, " \
               f"field={self.field!r})"


class BadRequest(ApiError):
    """400 / 413: the request is malformed or too large."""


class ValidationError(BadRequest):
    """422: a field is invalid; ``.field`` names it (dotted, e.g. "examples.0.input")."""


class Unauthorized(ApiError):
    """401: the route needs an API key."""


class Forbidden(ApiError):
    """403: the API key is not valid."""


class NotFound(ApiError):
    """404: no such task, job or route."""


class UnknownTask(NotFound):
    """404 for a task name the server does not know."""


class Conflict(ApiError):
    """409: e.g. the task exists already (adapt with overwrite=True) or is pretrained (cannot be deleted)."""


class BrokenTask(Conflict):
    """409: the task's file on the server is corrupt or truncated (the message names it); adapt or compose the task
    again with overwrite, or delete it."""


class Overloaded(ApiError):
    """503: the server is busy, loading or shutting down; try again after ``.retry_after`` seconds."""

    def __init__(self, status: int, type: str, message: str, field: str | None = None,  # noqa: A002
                 retry_after: float | None = None):
        super().__init__(status, type, message, field)
        self.retry_after = retry_after


class ServerError(ApiError):
    """5xx other than 503: a bug or a broken inventory on the server."""


class StorageError(ServerError):
    """507 (type "storage_full": the server's disk is full) or 503 (type "storage_unavailable": its folder is
    read-only or failing); the message names the folder. Nothing partial was written."""


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 413: BadRequest, 422: ValidationError, 401: Unauthorized,
                                         403: Forbidden, 404: NotFound, 409: Conflict, 503: Overloaded}
_BY_TYPE: dict[str, type[ApiError]] = {"unknown_task": UnknownTask, "broken_task": BrokenTask,
                                       "storage_full": StorageError, "storage_unavailable": StorageError}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_fields(response: httpx.Response) -> tuple[str, str, str | None]:
    try:
        error = response.json()["error"]
        return str(error["type"]), str(error["message"]), error.get("field")
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:500] or response.reason_phrase
        return "http_error", f"HTTP {response.status_code}: {text}", None


def raise_for_error(response: httpx.Response) -> None:
    """Raise the ApiError subclass for a 4xx/5xx response (reads {"error": {type, message, field}}); else return."""
    status = response.status_code
    if status < 400:
        return
    type_, message, field = _error_fields(response)
    cls = _BY_TYPE.get(type_) or _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    if issubclass(cls, Overloaded):
        raise cls(status, type_, message, field, retry_after=parse_retry_after(response.headers.get("retry-after")))
    raise cls(status, type_, message, field)
