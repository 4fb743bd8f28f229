"""GET /tasks, GET /tasks/{name}, DELETE /tasks/{name} (adapted only), GET /tasks/{name}/lora (a PEFT LoRA zip)."""

from __future__ import annotations

import asyncio
import io
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from adapter_store import AdapterStore

from ..deps import EngineDep, StoreDep
from ..schemas import ErrorResponse, TaskList, TaskOut
from ..security import MutatingKey, ReadingKey

router = APIRouter(tags=["tasks"])
ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409)}


@router.get("/tasks", response_model=TaskList, dependencies=ReadingKey)
async def list_tasks(store: StoreDep) -> TaskList:
    return TaskList(tasks=[TaskOut(**asdict(info)) for info in store.tasks()])


@router.get("/tasks/{name}", response_model=TaskOut, responses=ERRORS, dependencies=ReadingKey)
async def get_task(name: str, store: StoreDep) -> TaskOut:
    return TaskOut(**asdict(store.task(name)))


@router.delete("/tasks/{name}", response_model=TaskOut, responses=ERRORS)
async def delete_task(name: str, engine: EngineDep, _: MutatingKey) -> TaskOut:
    """Delete an adapted task (its file and cached adapters); pretrained tasks and __mu__ are refused (409)."""
    info = await asyncio.to_thread(engine.store.delete, name)
    engine.forget_task(name)
    return TaskOut(**asdict(info))


@router.get("/tasks/{name}/lora", responses={**ERRORS, 200: {"content": {"application/zip": {}}}})
async def export_lora(name: str, store: StoreDep, _: MutatingKey) -> Response:
    """The task's adapter as a standard PEFT LoRA folder, zipped (loadable by PeftModel, vLLM, LoRAX). Routing,
    writing and compressing run on a worker thread: the event loop keeps serving meanwhile."""
    store.task(name)
    archive = await asyncio.to_thread(zipped_lora, store, name)
    headers = {"Content-Disposition": f'attachment; filename="{name}-lora.zip"'}
    return Response(archive, media_type="application/zip", headers=headers)


def zipped_lora(store: AdapterStore, name: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        folder = store.export_lora(name, Path(tmp) / name)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.iterdir()):
                archive.write(path, arcname=f"{name}/{path.name}")
    return buffer.getvalue()
