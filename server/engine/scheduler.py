"""The serving loop: one thread owns the model and runs iterations (iteration-level scheduling, as Orca and vLLM).

    each iteration:
        plan = policy.plan(view of the queues and the running batch)      (plan.py: no model involved)
        carry out plan.other: an engine call, a /score chunk, or an /adapt training step
        drop the rows of clients that went away
        admit plan.admit waiting rows: route their adapters (misses together), prefill, join the batch
        one decoding step for every running row (running_batch.py), the tokens applied by the output step
        (output_step.py); rows that ended are answered at once and leave
Any thread may submit; results come back through futures, streamed text through each row's callback (called
on this thread). Beam searches are rows of the same batch (beam_rows.py): there is one decoding path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from .loop_clock import LoopClock
from .pinning import Resolve, pin, pinned
from .plan import LoopView, Plan, Policy, RowCost
from .running_batch import RunningBatch
from .score_queue import ScoreJob, ScoreQueue
from .sequence import GenerateJob, RowMaker, WaitingRow

log = logging.getLogger(__name__)
T = TypeVar("T")
ScoreChunk = Callable[[list[tuple]], list[tuple[float, int]]]  # [(text, choice, adapter, key)] -> [(sum, tokens)]


class ShuttingDown(RuntimeError):
    """The loop has stopped: nothing new is run."""


class KVCapacityError(ValueError):
    """A request the whole KV pool cannot hold: its input at admission (field `inputs`), or the positions it grows
    to — its rows had to leave a batch where nothing else was left to preempt (`max_new_tokens`)."""

    def __init__(self, message: str, field: str):
        super().__init__(f"{message}; raise MHR_KV_CACHE_BYTES (or MHR_MAX_BATCH_TOKENS), or {_REMEDY[field]}")
        self.field = field


_REMEDY = {"inputs": "send a shorter input", "max_new_tokens": "ask for fewer new tokens or beams"}


@dataclass
class _Call:
    fn: Callable[[], object]
    future: Future


@dataclass(frozen=True)
class LoopStats:
    running_rows: int
    waiting_rows: int
    iterations: int
    kv_blocks_total: int = 0  # the KV pool's blocks (scratch excluded)
    kv_blocks_free: int = 0
    kv_blocks_cached: int = 0  # unused, kept for the prefix cache (evictable)
    kv_block_size: int = 0
    preempted_rows: int = 0  # rows preempted so far (computed again later)
    prefix_cache_hits: int = 0  # prompt blocks taken from the prefix cache instead of computed
    encoder_cache_hits: int = 0  # T5 rows whose encoder output came from the cache instead of computed
    static_step: str | None = None  # the static-shaped step's mode ("cuda-graphs", "eager": graphs turned off)
    static_steps: int = 0  # decoding steps it ran
    graph_captures: int = 0  # CUDA graphs captured (one per bucket of rows, table width and adapter layout)
    joining_prefills: int = 0  # prefill forwards of rows joining the batch (each may hold several rows)
    joined_rows: int = 0  # rows that joined through them
    loop_seconds: dict[str, float] = field(default_factory=dict)  # the loop's time by phase (loop_clock.py)


class Scheduler:
    def __init__(self, batch: RunningBatch, policy: Policy, *, resolve: Resolve, make_rows: RowMaker,
                 score_chunk: ScoreChunk):
        """batch: the running batch (it runs the model); resolve: tasks -> adapters and keys; make_rows: a waiting
        row -> its batch rows; score_chunk: one /score forward."""
        self.batch = batch
        self.policy = policy
        self.resolve = resolve
        self.make_rows = make_rows
        self.score_chunk = score_chunk
        self.scores = ScoreQueue(chunk_pairs=policy.max_rows)
        self.iterations = 0
        self.clock = LoopClock()
        self.on_step: Callable[[int], None] | None = None  # told the batch size after each decoding step (metrics)
        self._waiting: deque[WaitingRow] = deque()  # rows for the decoding loop, in arrival order
        self._calls: deque[_Call] = deque()
        self._background: deque[_Call] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="serving-loop", daemon=True)
        self._thread.start()

    # ---- any thread --------------------------------------------------------------------------
    def submit_generate(self, job: GenerateJob) -> GenerateJob:
        with self._cv:
            self._check_open()
            self._waiting.extend(WaitingRow(job, index) for index in range(len(job.rows)))
            self._cv.notify()
        return job

    def submit_score(self, job: ScoreJob) -> ScoreJob:
        with self._cv:
            self._check_open()
            self.scores.add(job)
            self._cv.notify()
        return job

    def call(self, fn: Callable[[], T], *, background: bool = False) -> T:
        """Run fn on the loop thread between iterations and return its result (blocks the caller). Background
        calls (training steps) yield to generation (plan.py)."""
        if self.on_loop_thread():
            return fn()
        item = _Call(fn, Future())
        with self._cv:
            self._check_open()
            (self._background if background else self._calls).append(item)
            self._cv.notify()
        return item.future.result()

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def stats(self) -> LoopStats:
        with self._cv:
            waiting = len(self._waiting)
        blocks = self.batch.kv.blocks
        static = self.batch.kv.static
        return LoopStats(self.batch.occupied, waiting, self.iterations, blocks.total - 1, blocks.free, blocks.cached,
                         blocks.block_size, self.batch.preemptions, blocks.prefix_hits, self.batch.kv.encoder_hits,
                         *((static.mode, static.steps, static.captures) if static else (None, 0, 0)),
                         self.policy.prefills, self.policy.joined_rows, dict(self.clock.seconds))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish what was submitted (up to timeout_s), then end the thread; anything left fails."""
        deadline = time.monotonic() + timeout_s
        while self._busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=max(1.0, deadline - time.monotonic()))

    def _check_open(self) -> None:
        if self._stopping:
            raise ShuttingDown("the server is shutting down")

    def _busy(self) -> bool:
        with self._cv:
            return bool(self._waiting or self._calls or self._background or self.scores or self.batch.occupied)

    # ---- the loop thread ------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._has_work():
                    self._cv.wait(timeout=self._wake_in())
                if self._stopping:
                    break
            self.clock.lap("idle")
            try:
                self._iteration()
            except Exception as exc:  # a failed forward fails its requests; the loop goes on
                log.exception("serving loop iteration failed")
                self._fail_running(exc)
        self._fail_everything(ShuttingDown("the server is shutting down"))

    def _view(self) -> LoopView:
        """The policy's view of the queues (caller holds the lock); waiting rows are tokenised here, once."""
        waiting = []
        for entry in list(self._waiting)[: self.policy.max_rows]:  # no more than this many can join at once
            rows = self._started(entry)
            if rows is None:
                break
            waiting.append(RowCost(sum(self.batch.blocks_to_join(row) for row in rows), len(rows)))
        now = time.monotonic()
        return LoopView(self.batch.occupied, waiting, self.batch.kv.blocks.available(), len(self._calls),
                        int(bool(self.scores)), len(self._background), now,
                        now - self._waiting[0].arrived if self._waiting else 0.0)

    def _has_work(self) -> bool:
        if self._waiting or self._calls or self.scores or self.batch.occupied:
            return True
        return bool(self._background) and self.policy.background_wait(self._view()) <= 0

    def _wake_in(self) -> float | None:
        """How long the idle loop may sleep before a training step becomes due (None: until notified)."""
        return self.policy.background_wait(self._view()) if self._background else None

    def _iteration(self) -> None:
        self.iterations += 1
        with self._cv:
            self._drop_ended_waiting()
            plan = self.policy.plan(self._view())
        self.clock.lap("plan")
        self._run_other(plan)
        self._drop_cancelled()
        self.clock.lap("other")
        if plan.admit:
            self._admit(plan)
        self._finish(self.batch.advance_prefill())
        self.clock.lap("prefill")
        if plan.decode and len(self.batch):
            ended = self.batch.step()
            self.clock.lap("decode")
            self._requeue(self.batch.preempted)
            self._fail_outgrown(self.batch.outgrown)
            self._finish(ended)
            if self.on_step is not None:
                self.on_step(len(self.batch))
            self.clock.lap("answer")

    def _run_other(self, plan: Plan) -> None:
        if plan.other == "score":
            self._run_score_chunk()
            return
        queue = self._calls if plan.other == "call" else self._background if plan.other == "background" else None
        if not queue:
            return
        with self._cv:
            item = queue.popleft()
        started = time.monotonic()
        _settle(item)
        if plan.other == "background":
            self.policy.background_ran(started, time.monotonic())

    def _run_score_chunk(self) -> None:
        with self._cv:
            chunk = self.scores.next_chunk()
        pin(self.resolve, list({id(job): job for job, _ in chunk.members}.values()))
        members = [(job, i) for job, i in chunk.members if not job.future.done()]
        if not members:
            return
        pairs = [(job.pairs[i][0].text, job.pairs[i][1], *job.pinned[job.pairs[i][0].task]) for job, i in members]
        try:
            scored = self.score_chunk(pairs)
        except Exception as exc:  # its requests get the error; the loop goes on
            log.exception("a /score chunk failed")
            for job, _ in members:
                job.fail(exc)
            return
        for (job, i), (logprob, tokens) in zip(members, scored, strict=True):
            job.record(i, logprob, tokens)

    # ---- generation rows --------------------------------------------------------------------------
    def _started(self, entry: WaitingRow) -> list | None:
        """The entry's batch rows, made once (tokenised); None if it failed (its request gets the error)."""
        if entry.started is None:
            try:
                entry.started = self.make_rows(entry)
            except Exception as exc:  # e.g. it cannot be tokenised: the request fails, the rows behind go on
                entry.job.fail(exc)
                return None
        return entry.started

    def _drop_ended_waiting(self) -> None:
        """Waiting rows of requests that were cancelled or failed leave the queue (caller holds the lock)."""
        for entry in [e for e in self._waiting if e.job.ended or e.job.cancelled.is_set()]:
            self._waiting.remove(entry)
            entry.job.abandon()

    def _admit(self, plan: Plan) -> None:
        with self._cv:
            entries = [self._waiting.popleft() for _ in range(plan.admit)]
        if not pin(self.resolve, list({id(e.job): e.job for e in entries}.values())):
            entries = [e for e in entries if not e.job.ended]
        joining = [row for entry in entries for row in entry.started]
        for row in joining:
            row.adapter, row.key = pinned(row.job, row.job.rows[row.index])
        if not joining:
            return
        try:
            started = time.perf_counter()
            ended = self.batch.admit(joining)
            self.policy.prefill_ran(time.perf_counter() - started, len(joining))
            self._finish(ended)
        except MemoryError as exc:  # more than the whole KV pool: these requests fail, the running rows go on
            for row in joining:
                row.job.fail(KVCapacityError(f"the KV cache cannot hold this request's input ({exc})", "inputs"))

    def _fail_outgrown(self, rows: list) -> None:
        """Requests whose rows could not take their next block even alone in the batch: they never will (queued again,
        a beam search would start over forever)."""
        blocks = self.batch.kv.blocks
        for job in {id(row.job): row.job for row in rows}.values():
            job.fail(KVCapacityError(f"the KV cache cannot hold this request as it grows: alone in the batch it needed "
                                     f"more than the pool's {blocks.total - 1} blocks of {blocks.block_size} positions",
                                     "max_new_tokens"))

    def _requeue(self, preempted: list) -> None:
        """Preempted rows wait again at the front of the queue, in their order (they are computed again)."""
        if not preempted:
            return
        entries: dict[tuple[int, int], WaitingRow] = {}
        for row in preempted:
            entry = entries.setdefault((id(row.job), row.index), WaitingRow(row.job, row.index, started=[]))
            entry.started.append(row)
        with self._cv:
            self._waiting.extendleft(reversed(list(entries.values())))

    def _drop_cancelled(self) -> None:
        gone = {row for row in [*self.batch.rows, *self.batch.prefilling] if row.job.cancelled.is_set()}
        for row in gone:
            row.job.abandon()
        self.batch.retire(gone)

    def _finish(self, ended: list) -> None:
        """Answer the rows that ended, after they left the batch (so a caller woken by its answer finds the
        loop's layers cleared when the batch emptied)."""
        self.batch.retire(set(ended))
        for row in ended:
            row.finish()

    # ---- failures ------------------------------------------------------------------------------
    def _fail_running(self, exc: BaseException) -> None:
        for row in [*self.batch.rows, *self.batch.prefilling]:
            row.job.fail(exc)
        self.batch.clear()

    def _fail_everything(self, exc: BaseException) -> None:
        self._fail_running(exc)
        with self._cv:
            for entry in self._waiting:
                entry.job.fail(exc)
            self._waiting.clear()
            for item in [*self._calls, *self._background]:
                item.future.set_exception(exc)
            self._calls.clear()
            self._background.clear()
            self.scores.drain(lambda job: job.fail(exc))


def _settle(item: _Call) -> None:
    try:
        item.future.set_result(item.fn())
    except BaseException as exc:  # handed to the caller, who re-raises it
        item.future.set_exception(exc)
