"""mhr-client: a typed, torch-free client (and the ``mhr`` CLI) for the mhr-serve HTTP API.

    from client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as mhr:
        print(mhr.generate("alpha", "hello").texts)
"""

from ._client import AsyncClient, Client
from .exceptions import (
    ApiError,
    BadRequest,
    BrokenTask,
    Conflict,
    ExportError,
    Forbidden,
    MhrError,
    NotFound,
    Overloaded,
    ServerError,
    StorageError,
    TransportError,
    Unauthorized,
    UnknownTask,
    ValidationError,
    WaitTimeout,
    raise_for_error,
)
from .models import (
    AdaptJob,
    BrokenTaskInfo,
    ChoiceScore,
    GenerateResponse,
    Output,
    Readiness,
    ScoreResponse,
    ScoreResult,
    StreamEvent,
    TaskInfo,
    TokenLogprob,
    TopToken,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptJob", "ApiError", "AsyncClient", "BadRequest", "BrokenTask", "BrokenTaskInfo", "ChoiceScore", "Client",
    "Conflict", "ExportError", "Forbidden", "GenerateResponse", "MhrError", "NotFound", "Output", "Overloaded",
    "Readiness", "ScoreResponse", "ScoreResult", "ServerError", "StorageError", "StreamEvent", "TaskInfo",
    "TokenLogprob", "TopToken", "TransportError", "Unauthorized", "UnknownTask", "Usage", "ValidationError",
    "WaitTimeout", "raise_for_error",
]
