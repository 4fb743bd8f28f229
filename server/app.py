"""create_app(): the FastAPI application. Heavy things load in the lifespan unless injected (tests)."""

from __future__ import annotations

import logging
import sys
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from adapter_store import AdapterCache, AdapterStore

from .adapt import JobManager
from .admission import Admission
from .engine import Engine, load_model
from .errors import install_error_handlers
from .limits import BodySizeLimit
from .metrics import Metrics, MetricsMiddleware
from .routes import adapt, docs, generate, health, openai, route_explain, score, tasks
from .routes import metrics as metrics_route
from .settings import Settings
from .torch_threads import in_own_thread

log = logging.getLogger("mhr_serve")
# The serving loop's thread runs Python between its kernels; the event loop's thread waits for the GIL each time it
# comes back from a socket, by default up to 5 ms (a convoy: many waits per request). 0.5 ms measured on the demo
# with 32 clients: 1850-2036 -> 2117-2200 tokens/s, /healthz under that load 6.6-7.5 -> 5.6-6.5 ms.
GIL_SWITCH_INTERVAL_S = 0.0005


def build_engine(settings: Settings) -> Engine:
    """Load the backbone and the inventory, check one against the other, wrap the target layers."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    refresh_s = settings.store_refresh_s if settings.shared_store else None
    store = AdapterStore.open(settings.inventory, settings.adapted_dir, refresh_s=refresh_s)
    loaded = load_model(settings.model, settings.device, settings.dtype)
    cache = AdapterCache(settings.cache_bytes, loaded.device, loaded.dtype)
    engine = Engine(loaded, store, cache, merge_single_task=settings.merge_single_task,
                    max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens,
                    longest_row=settings.max_input_tokens + settings.max_new_tokens + 1,
                    prepack_weights=settings.prepack_weights, memory_fraction=settings.memory_fraction,
                    memory_limit_bytes=settings.memory_limit_bytes, kv_block_size=settings.kv_block_size,
                    kv_cache_bytes=settings.kv_cache_bytes, prefix_cache=settings.prefix_cache,
                    prefill_chunk=settings.prefill_chunk, gather_joins=settings.gather_joins,
                    static_step=_static_step(settings, torch.device(loaded.device)))
    store.on_change(engine.forget_task)  # another server's new version or deletion: drop the cached adapters
    log.info("serving %s with inventory %s (%d tasks, fingerprint %s) on %s/%s%s", settings.model,
             settings.inventory, len(store.tasks()), store.fingerprint, loaded.device, loaded.dtype,
             ", prepacked weights" if engine.prepacked else "")
    return engine


def _static_step(settings: Settings, device: torch.device) -> str | None:
    """MHR_CUDA_GRAPHS: the static-shaped step as CUDA graphs; unset: on CUDA, off elsewhere (true on a CPU is
    refused at start-up)."""
    wanted = settings.cuda_graphs if settings.cuda_graphs is not None else device.type == "cuda"
    return "cuda-graphs" if wanted else None


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = engine is None
        app.state.engine = served = engine or await in_own_thread(build_engine, settings)
        await in_own_thread(served.warm_up)
        served.loop.on_step = metrics.batch_rows.observe
        app.state.admission = Admission(served, max_queue=settings.max_queue)
        app.state.jobs = JobManager(served, served.store.adapted_dir / ".jobs", max_queued=settings.adapt_max_queued,
                                    shared=settings.shared_store)
        app.state.jobs.start()
        metrics.watch(lambda: app.state.admission.pending, served.stats, served.cache.stats,
                      lambda: [job.state for job in app.state.jobs.jobs.values()])
        metrics.show_memory_plan(served.memory)
        try:
            yield
        finally:
            await in_own_thread(app.state.jobs.stop)
            await app.state.admission.stop()
            if owned:
                await in_own_thread(served.close)

    app = FastAPI(title="mhr-serve", version="0.1.0", lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None, description="Serve Poly / MHR adapter inventories: one backbone, many tasks.")
    app.state.settings = settings
    app.state.metrics = metrics = Metrics()
    app.state.engine = app.state.admission = app.state.jobs = None
    install_error_handlers(app)
    for module in (health, tasks, generate, score, route_explain, adapt, openai, metrics_route, docs):
        app.include_router(module.router)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
