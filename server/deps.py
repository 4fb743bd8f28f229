"""FastAPI dependencies: the components the lifespan put on app.state, typed for routes.

They are coroutines: FastAPI runs a plain function dependency in a worker thread, and these only read app.state
(a request of /generate went through five thread hops before its handler ran)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from adapter_store import AdapterStore

from .adapt import JobManager
from .admission import Admission
from .engine import Engine
from .errors import ApiError
from .metrics import Metrics
from .settings import Settings


def _state(request: Request, name: str):
    value = getattr(request.app.state, name, None)
    if value is None:
        raise ApiError(503, "unavailable", "the model is still loading; GET /readyz says when it is ready")
    return value


async def get_engine(request: Request) -> Engine:
    return _state(request, "engine")


async def get_admission(request: Request) -> Admission:
    return _state(request, "admission")


async def get_jobs(request: Request) -> JobManager:
    return _state(request, "jobs")


async def get_store(request: Request) -> AdapterStore:
    return _state(request, "engine").store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


EngineDep = Annotated[Engine, Depends(get_engine)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
StoreDep = Annotated[AdapterStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
