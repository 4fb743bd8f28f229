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
    loop = engine.stats()
    kv = {"block_size": loop.kv_block_size, "blocks_total": loop.kv_blocks_total, "blocks_free": loop.kv_blocks_free,
          "blocks_cached": loop.kv_blocks_cached, "preempted_rows": loop.preempted_rows,
          "prefix_cache_hit_blocks": loop.prefix_cache_hits, "encoder_cache_hits": loop.encoder_cache_hits}
    return {"status": "ready", "inventory": engine.store.fingerprint, "tasks": len(engine.store.tasks()),
            "broken_tasks": [broken._asdict() for broken in engine.store.broken_tasks()],
            "device": str(engine.loaded.device), "dtype": str(engine.loaded.dtype).removeprefix("torch."),
            "memory": engine.memory.as_dict(), "kv": kv, "static_step": {
                "mode": loop.static_step, "steps": loop.static_steps, "graph_captures": loop.graph_captures}}
