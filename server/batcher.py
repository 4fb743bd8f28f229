"""Dynamic batching: requests wait in an asyncio queue; a collector takes up to `max_batch_size` rows
(waiting at most `max_batch_wait` after the first) and runs them on the engine's single worker thread,
so the event loop never blocks on torch. Requests of different tasks share a batch."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from adapter_store import StoreError

from .engine import Engine

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int = 1):
        self.retry_after = retry_after
        super().__init__("the server is overloaded: too many queued requests")


class ShuttingDown(RuntimeError):
    pass


@dataclass
class _Item:
    kind: str  # "generate" | "score"
    rows: Sequence
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(self, engine: Engine, *, max_batch_size: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[int], None] | None = None):
        self.engine = engine
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.on_batch = on_batch  # called with each batch's row count (metrics)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._accepting = True
        self.pending = 0  # items queued or running

    async def start(self) -> None:
        self._task = asyncio.create_task(self._collect_forever(), name="batcher")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting; let queued and running work finish (up to `timeout_s`); free the worker."""
        self._accepting = False
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.pending and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
        self.executor.shutdown(wait=True)

    def wait_until_idle(self, max_wait_s: float = 0.5) -> None:
        """Block the calling (non-event-loop) thread while requests wait, at most `max_wait_s`."""
        deadline = time.monotonic() + max_wait_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.002)

    async def generate(self, rows: Sequence) -> list:
        return await self._submit("generate", rows)

    async def score(self, rows: Sequence) -> list:
        return await self._submit("score", rows)

    def check_capacity(self) -> None:
        """Raise ShuttingDown or Overloaded if a new request would be refused now."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down")
        if self.pending >= self.max_queue:
            raise Overloaded()

    async def _submit(self, kind: str, rows: Sequence) -> list:
        self.check_capacity()
        item = _Item(kind, rows, asyncio.get_running_loop().create_future())
        self.pending += 1
        try:
            self._queue.put_nowait(item)
            return await asyncio.shield(item.future)
        finally:
            self.pending -= 1

    async def _collect_forever(self) -> None:
        while True:
            batch = await self._collect()
            for kind in ("generate", "score"):
                items = [item for item in batch if item.kind == kind]
                if items:
                    await self._run(kind, items)

    async def _collect(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        rows = len(batch[0].rows)
        deadline = loop.time() + self.max_wait_s
        while rows < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            batch.append(item)
            rows += len(item.rows)
        return batch

    async def _run(self, kind: str, items: list[_Item]) -> None:
        fn = self.engine.generate if kind == "generate" else self.engine.score
        rows = [row for item in items for row in item.rows]
        if self.on_batch:
            self.on_batch(len(rows))
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, fn, rows)
        except Exception as exc:
            if len(items) > 1:  # isolate the failing request; the others still get their answers
                for item in items:
                    await self._run(kind, [item])
                return
            if not isinstance(exc, StoreError):
                log.exception("%s batch failed", kind)
            _settle(items[0], exc=exc)
            return
        start = 0
        for item in items:
            _settle(item, result=results[start: start + len(item.rows)])
            start += len(item.rows)


def _settle(item: _Item, *, result=None, exc: BaseException | None = None) -> None:
    if item.future.done():
        return
    if exc is not None:
        item.future.set_exception(exc)
    else:
        item.future.set_result(result)
