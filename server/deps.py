"""FastAPI dependencies: the components the lifespan put on app.state, typed for routes."""

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


def get_engine(request: Request) -> Engine:
    return _state(request, "engine")


def get_admission(request: Request) -> Admission:
    return _state(request, "admission")


def get_jobs(request: Request) -> JobManager:
    return _state(request, "jobs")


def get_store(request: Request) -> AdapterStore:
    return _state(request, "engine").store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


EngineDep = Annotated[Engine, Depends(get_engine)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]
StoreDep = Annotated[AdapterStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
