"""GET /tasks and GET /tasks/{name}: what can be served, with kind, version and method."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from ..deps import StoreDep
from ..schemas import ErrorResponse, TaskList, TaskOut

router = APIRouter(tags=["tasks"])


@router.get("/tasks", response_model=TaskList)
async def list_tasks(store: StoreDep) -> TaskList:
    return TaskList(tasks=[TaskOut(**asdict(info)) for info in store.tasks()])


@router.get("/tasks/{name}", response_model=TaskOut, responses={404: {"model": ErrorResponse}})
async def get_task(name: str, store: StoreDep) -> TaskOut:
    return TaskOut(**asdict(store.task(name)))
