"""The event loop's door to the engine's serving loop: refuse work beyond the queue limit (503), await results
without blocking the event loop, and retire the rows of a client that went away.

    completions = await admission.generate(rows, until_disconnect=request)   # plain request
    async for index, piece, completions in admission.stream(rows): ...        # streamed (SSE)
    results = await admission.score(rows)
`pending` counts requests submitted and not yet answered (queued or running): the queue depth.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from starlette.requests import Request

from .engine import Completion, Engine, GenerateRow, RowScores, ScoreRow, ShuttingDown
from .engine.rows import TokenLogprob
from .torch_threads import in_own_thread


class Overloaded(RuntimeError):
    """The queue is full; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int = 1):
        self.retry_after = retry_after
        super().__init__("the server is overloaded: too many queued requests")


class ClientGone(Exception):
    """The client disconnected before its answer was ready (its rows were retired)."""


class Admission:
    def __init__(self, engine: Engine, *, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self.pending = 0
        self._accepting = True

    def check_capacity(self) -> None:
        """Raise ShuttingDown or Overloaded if a new request would be refused now."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down")
        if self.pending >= self.max_queue:
            raise Overloaded()

    async def generate(self, rows: Sequence[GenerateRow], *, until_disconnect: Request | None = None
                       ) -> list[Completion]:
        """The rows' completions; if the client disconnects first, its rows are retired and ClientGone raised."""
        self.check_capacity()
        self.pending += 1
        job = None
        try:
            job = self.engine.submit_generate(rows)
            result = asyncio.wrap_future(job.future)
            if until_disconnect is None:
                return await result
            gone = asyncio.ensure_future(_disconnected(until_disconnect))
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
            if result.done():
                gone.cancel()
                return result.result()
            job.cancel()
            raise ClientGone()
        except asyncio.CancelledError:
            if job is not None:
                job.cancel()
            raise
        finally:
            self.pending -= 1

    async def stream(self, rows: list[GenerateRow]) -> AsyncIterator[tuple[int, str, list[Completion] | None]]:
        """Yield (row, new text, None) as each row's text arrives, then the rest of each row's text, then
        (-1, "", completions). Leaving the iteration early (a client gone) retires the rows."""
        self.check_capacity()
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

        def sink(index: int):
            return lambda text: loop.call_soon_threadsafe(pieces.put_nowait, (index, text))

        for index, row in enumerate(rows):
            row.on_text = sink(index)
        self.pending += 1
        job = getter = None
        try:
            job = self.engine.submit_generate(rows)
            result = asyncio.wrap_future(job.future)
            sent = [""] * len(rows)
            while not (result.done() and pieces.empty()):
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, result}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                index, text = getter.result()
                sent[index] += text
                yield index, text, None
            completions = result.result()
            for index, completion in enumerate(completions):
                rest = completion.text[len(sent[index]):] if completion.text.startswith(sent[index]) else ""
                if rest:
                    yield index, rest, None
            yield -1, "", completions
        finally:
            if getter is not None and not getter.done():
                getter.cancel()  # the client went away while a piece was awaited
            if job is not None and not job.future.done():
                job.cancel()
            self.pending -= 1

    async def score(self, rows: Sequence[ScoreRow]) -> list[RowScores]:
        self.check_capacity()
        self.pending += 1
        try:
            return await asyncio.wrap_future(self.engine.submit_score(rows).future)
        finally:
            self.pending -= 1

    async def prompt_logprobs(self, task, prompts: list[list[int]], top_k: int) -> list[list[TokenLogprob]]:
        """Causal LM: each prompt token's log-probability and the top_k most likely tokens (Engine.prompt_logprobs)."""
        self.check_capacity()
        self.pending += 1
        try:
            return await in_own_thread(self.engine.prompt_logprobs, task, prompts, top_k)
        finally:
            self.pending -= 1

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new work; wait (up to timeout_s) for what is in flight."""
        self._accepting = False
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.pending and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body is read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
