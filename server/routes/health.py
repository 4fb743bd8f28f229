"""GET /healthz (the process answers) and GET /readyz (model and inventory loaded)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..schemas import error_body

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return JSONResponse({"status": "loading", **error_body("unavailable", "still loading")}, status_code=503)
    return {"status": "ready", "inventory": engine.store.fingerprint, "tasks": len(engine.store.tasks()),
            "broken_tasks": [broken._asdict() for broken in engine.store.broken_tasks()],
            "device": str(engine.loaded.device), "dtype": str(engine.loaded.dtype).removeprefix("torch."),
            "memory": engine.memory.as_dict()}
