"""The engine replica: the whole single-process app (create_app: routes, engine with its serving loop, jobs) on one
backbone, serving the requests the ingress relays. Ray Serve's model multiplexing (model id = task name) keeps up to
tasks_per_replica tasks resident here and tells the routers which, so a task's requests come back here.

    resident = await self.resident(task)    # @serve.multiplexed loader: the task's adapter in the engine's cache
    async for item in self.handle(request)  # ResponseStart (+ X-MHR-Replica, X-MHR-Resident), then body chunks
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable

from ray import serve

from adapter_store import StoreError

from ..app import create_app
from ..engine import Engine
from ..settings import Settings
from ..torch_threads import in_own_thread
from .relay import PID_HEADER, REPLICA_HEADER, RESIDENT_HEADER, RelayedRequest, ResponseStart, serve_asgi

log = logging.getLogger(__name__)


class Resident:
    """A task Ray Serve counts as loaded on this replica (its adapter is in the engine's cache). Ray Serve calls
    __del__ when it unloads the task (least recently used beyond tasks_per_replica): its adapters leave the cache,
    so what Ray Serve routes by and what is resident agree."""

    def __init__(self, task: str, release: Callable[[str], object]):
        self.task = task
        self._release: Callable[[str], object] | None = release

    def __del__(self) -> None:
        release, self._release = self._release, None  # once: Ray Serve's call, not the garbage collector's too
        if release is not None:
            try:
                release(self.task)
            except Exception:  # a destructor must not raise
                log.exception("releasing task %r", self.task)


@serve.deployment(name="EngineReplica", max_ongoing_requests=32, health_check_period_s=5,
                  graceful_shutdown_timeout_s=30)
class EngineReplica:
    async def __init__(self, settings: dict, tasks_per_replica: int):
        """settings: Settings fields for this replica (MHR_* environment variables fill the rest); the store is
        always shared with the other replicas."""
        self.app = create_app(Settings(**{**settings, "shared_store": True}))
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # loads the model, warms up, starts the serving loop and the jobs
        self.engine: Engine = self.app.state.engine
        self.name = serve.get_replica_context().replica_id.unique_id
        self._identity = ((REPLICA_HEADER, self.name.encode()), (PID_HEADER, str(os.getpid()).encode()))

        async def load_adapter(task: str) -> Resident:
            await in_own_thread(self.engine.adapter, task)  # unknown, broken: raises, so not counted loaded
            return Resident(task, self.engine.forget_task)

        # made here, not at class level, because tasks_per_replica is an argument
        self.resident = serve.multiplexed(max_num_models_per_replica=tasks_per_replica)(load_adapter)
        log.info("replica %s (pid %d) ready, up to %d resident tasks", self.name, os.getpid(), tasks_per_replica)

    async def handle(self, request: RelayedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """Serve one relayed request with the app; its task (the multiplexed model id) is made resident first."""
        headers = list(self._identity)
        task = serve.get_multiplexed_model_id()
        was_resident = self.is_resident(task) if task else None
        if was_resident is not None:
            with contextlib.suppress(StoreError):  # deleted meanwhile: the app answers it (404)
                await self.resident(task)
            headers.append((RESIDENT_HEADER, b"true" if was_resident else b"false"))
        async for item in serve_asgi(self.app, request, headers):
            yield item

    def is_resident(self, task: str) -> bool | None:
        """Whether the adapter of the task's current version is in the engine's cache; None for a task that cannot
        be served (unknown, a composition whose member is gone: the app answers 404 or 409)."""
        try:
            return self.engine.store.cache_key(task) in self.engine.cache
        except StoreError:
            return None

    async def __del__(self) -> None:
        """Graceful shutdown: requests in flight finish, running adaptation jobs are cancelled (nothing written)."""
        await self._lifespan.__aexit__(None, None, None)
