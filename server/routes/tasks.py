"""GET /tasks, GET /tasks/{name}, POST /tasks (a named mix or Arrow route), DELETE /tasks/{name} (adapted or composed),
GET /tasks/{name}/lora (a PEFT LoRA zip)."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from adapter_store import AdapterStore, BrokenCompositionError, MixError, TaskConflictError, TaskNameError
from adapter_store.persistence import writing_to

from ..deps import EngineDep, SettingsDep, StoreDep
from ..errors import ApiError, as_api_error
from ..schemas import ComposeRequest, ErrorResponse, TaskList, TaskOut
from ..security import MutatingKey, ReadingKey
from ..torch_threads import in_own_thread
from .validation import arrow_spec, invalid

router = APIRouter(tags=["tasks"])
ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 503, 507)}


@router.get("/tasks", response_model=TaskList, dependencies=ReadingKey)
async def list_tasks(store: StoreDep) -> TaskList:
    return TaskList(tasks=[TaskOut.of(info) for info in store.listing()])


@router.get("/tasks/{name}", response_model=TaskOut, responses=ERRORS, dependencies=ReadingKey)
async def get_task(name: str, store: StoreDep) -> TaskOut:
    return TaskOut.of(store.describe(name))


@router.post("/tasks", status_code=201, response_model=TaskOut, responses={**ERRORS, 422: {"model": ErrorResponse}})
async def compose(body: ComposeRequest, engine: EngineDep, settings: SettingsDep, _: MutatingKey) -> TaskOut:
    """A named mix: persisted (atomic, versioned), listed with its recipe, servable, exportable, deletable. It is
    resolved from its members each time it is routed, so a member's new version reaches it; a member deleted
    makes it fail with 409 until it is composed again without that member. Or a named Arrow route (`route`):
    persisted, versioned, listed, deletable the same way, served by routing each token (not exportable: it is
    no single LoRA)."""
    if (body.mix is None) == (body.route is None):
        raise invalid("mix", "give either `mix` (a named mix) or `route` (a named Arrow route), not both or neither")
    try:
        engine.store.check_writable(body.name, overwrite=body.overwrite)
        if body.route is not None:
            spec = arrow_spec(engine, body.route, "route")
            info = await in_own_thread(engine.store.save_route, body.name, spec, overwrite=body.overwrite)
        else:
            mix = engine.store.check_mix(body.mix, settings.max_mix_tasks)
            info = await in_own_thread(engine.store.save_composition, body.name, mix, overwrite=body.overwrite)
    except MixError as exc:
        raise invalid(exc.field, str(exc)) from None
    except (TaskNameError, TaskConflictError, BrokenCompositionError) as exc:  # about `name`, not a request's task
        error = as_api_error(exc)
        raise ApiError(error.status, error.type, str(exc), "name") from None
    engine.forget_task(body.name)  # an older version's cached adapter
    return TaskOut.of(info)


@router.delete("/tasks/{name}", response_model=TaskOut, responses=ERRORS)
async def delete_task(name: str, engine: EngineDep, _: MutatingKey) -> TaskOut:
    """Delete an adapted, composed or broken task (its file and cached adapters); pretrained tasks and __mu__ are
    refused (409)."""
    info = await in_own_thread(engine.store.delete, name)
    engine.forget_task(name)
    return TaskOut.of(info)


@router.get("/tasks/{name}/lora", responses={**ERRORS, 200: {"content": {"application/zip": {}}}})
async def export_lora(name: str, store: StoreDep, _: MutatingKey) -> Response:
    """The task's adapter as a standard PEFT LoRA folder, zipped (loadable by PeftModel, vLLM, LoRAX). Routing,
    writing and compressing run on a worker thread: the event loop keeps serving meanwhile."""
    store.task(name)
    archive = await in_own_thread(zipped_lora, store, name)
    headers = {"Content-Disposition": f'attachment; filename="{name}-lora.zip"'}
    return Response(archive, media_type="application/zip", headers=headers)


def zipped_lora(store: AdapterStore, name: str) -> bytes:
    with writing_to(Path(tempfile.gettempdir())), tempfile.TemporaryDirectory() as tmp:
        folder = store.export_lora(name, Path(tmp) / name)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.iterdir()):
                archive.write(path, arcname=f"{name}/{path.name}")
    return buffer.getvalue()
