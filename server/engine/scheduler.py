"""The serving loop: one thread owns the model and runs iterations (iteration-level scheduling, as Orca and vLLM).

    each iteration:
        at most one other piece of work: a /score chunk, a beam-search (or static) guest's decoding step, or a
            call from the engine's API; an /adapt training step only while it does not crowd out generation
        admit waiting rows while rows (max_rows) and cache positions (max_tokens) allow: route their adapters
            (misses together), prefill them, join them to the running batch
        one decoding step for every running row; rows that end (end of sequence, their own max_new_tokens, a
            stop string) are answered at once and leave; rows whose client went away leave too
Any thread may submit; results come back through futures, streamed text through each row's callback (called
on this thread). "static" mode keeps the request-level batching this server had before, for comparison.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from .guest_batches import GuestQueue, finish_guest, make_guest
from .pinning import pin, pinned
from .running_batch import RunningBatch, cost
from .score_queue import ScoreJob, ScoreQueue
from .scoring import score_pairs
from .sequence import ActiveRow, GenerateJob, WaitingRow

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)
T = TypeVar("T")
SchedulerMode = Literal["continuous", "static"]


class ShuttingDown(RuntimeError):
    """The loop has stopped: nothing new is run."""


@dataclass
class _Call:
    fn: Callable[[], object]
    future: Future


@dataclass(frozen=True)
class LoopStats:
    running_rows: int
    waiting_rows: int
    iterations: int


class Scheduler:
    def __init__(self, engine: Engine, *, max_rows: int, max_tokens: int, mode: SchedulerMode = "continuous",
                 max_wait_s: float = 0.005, background_share: float = 0.2, background_grace_s: float = 0.02):
        self.engine = engine
        self.mode = mode
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.background_share = background_share  # of loop time, for /adapt steps while generation is busy
        self.background_grace_s = background_grace_s  # idle this long before a background step starts
        m = engine.loaded
        self.batch = RunningBatch(m.model, m.tokenizer, m.is_seq2seq, m.device, engine.slots,
                                  eos_ids=engine.eos_ids, merge_single_task=engine.merge_single_task)
        self.scores = ScoreQueue(chunk_pairs=max_rows)
        self.guests = GuestQueue(max_rows, static=mode == "static", max_wait_s=max_wait_s)
        self.iterations = 0
        self.on_step: Callable[[int], None] | None = None  # told the batch size after each decoding step (metrics)
        self._waiting: deque[WaitingRow] = deque()  # rows for the decoding loop, in arrival order
        self._calls: deque[_Call] = deque()
        self._background: deque[_Call] = deque()
        self._background_after = 0.0  # monotonic time before which a busy loop runs no background step
        self._last_served = 0.0  # monotonic time the loop last had generation or scoring to do
        self._turn = 0
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="serving-loop", daemon=True)
        self._thread.start()

    # ---- any thread --------------------------------------------------------------------------
    def submit_generate(self, job: GenerateJob) -> GenerateJob:
        with self._cv:
            self._check_open()
            for index, row in enumerate(job.rows):
                beams = row.params.num_beams > 1
                (self.guests.add if beams or self.mode == "static" else self._waiting.append)(WaitingRow(job, index))
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
        calls (training steps) yield to generation: see `_run_background`."""
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
            waiting = len(self._waiting) + len(self.guests.waiting)
        return LoopStats(len(self.batch), waiting, self.iterations)

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
            return bool(self._waiting or self._calls or self._background or self.scores or self.guests
                        or len(self.batch))

    # ---- the loop thread ------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._has_work():
                    self._cv.wait(timeout=self._wake_in())
                if self._stopping:
                    break
            try:
                self._iteration()
            except Exception as exc:  # a failed forward fails its requests; the loop goes on
                log.exception("serving loop iteration failed")
                self._fail_running(exc)
        self._fail_everything(ShuttingDown("the server is shutting down"))

    def _has_work(self) -> bool:
        due_guest = bool(self.guests) and not self.guests.wake_in()
        due_background = bool(self._background) and not self._background_wait()
        return bool(self._waiting or self._calls or self.scores or len(self.batch) or due_guest or due_background)

    def _wake_in(self) -> float | None:
        """How long the idle loop may sleep before something becomes due (None: until notified)."""
        waits = [w for w in (self.guests.wake_in(), self._background_wait() if self._background else None)
                 if w is not None]
        return min(waits) if waits else None

    def _serving(self) -> bool:
        """Generation or scoring to do (what background steps yield to)."""
        busy = bool(len(self.batch) or self._waiting or self.scores or self.guests)
        if busy:
            self._last_served = time.monotonic()
        return busy

    def _background_wait(self) -> float:
        """Seconds before a background step may start: at once when nothing was served for a grace period (the
        next request of a client usually follows within it); while serving, after generation has had
        (1 - share) / share times as long as the last step took, so steps still get `share` of the loop."""
        now = time.monotonic()
        if self._serving():
            return max(0.0, self._background_after - now)
        return max(0.0, self._last_served + self.background_grace_s - now)

    def _iteration(self) -> None:
        self.iterations += 1
        if not self._run_one_other():
            self._run_background()
        self._drop_cancelled()
        self._admit()
        if len(self.batch):
            self._finish(self.batch.step())
            if self.on_step is not None:
                self.on_step(len(self.batch))

    def _run_one_other(self) -> bool:
        """One piece of work that is not the running batch, taking turns between the kinds."""
        kinds = (self._run_call, self._run_score_chunk, self._run_guest_turn)
        for _ in range(len(kinds)):
            self._turn = (self._turn + 1) % len(kinds)
            if kinds[self._turn]():
                return True
        return False

    def _run_call(self) -> bool:
        with self._cv:
            if not self._calls:
                return False
            item = self._calls.popleft()
        _settle(item)
        return True

    def _run_background(self) -> None:
        """A training step, when it is due (see _background_wait)."""
        with self._cv:
            if not self._background or self._background_wait() > 0:
                return
            item = self._background.popleft()
        start = time.monotonic()
        _settle(item)
        took = time.monotonic() - start
        self._background_after = time.monotonic() + took * (1 - self.background_share) / self.background_share

    def _run_score_chunk(self) -> bool:
        with self._cv:
            if not self.scores:
                return False
            chunk = self.scores.next_chunk()
        pin(self.engine, list({id(job): job for job, _ in chunk.members}.values()))
        members = [(job, i) for job, i in chunk.members if not job.future.done()]
        if not members:
            return True
        adapters = [job.pinned[job.pairs[i][0].task] for job, i in members]
        m = self.engine.loaded
        single = len({id(a) for a, _ in adapters}) == 1
        try:
            with self.engine.slots.activate([a for a, _ in adapters], key=adapters[0][1],
                                            merge=single and not len(self.batch) and self.engine.merge_single_task):
                scored = score_pairs(m.model, m.tokenizer, m.is_seq2seq, m.device,
                                     [job.pairs[i][0].text for job, i in members],
                                     [job.pairs[i][1] for job, i in members])
        except Exception as exc:  # its requests get the error; the loop goes on
            log.exception("a /score chunk failed")
            for job, _ in members:
                job.fail(exc)
            return True
        for (job, i), (logprob, tokens) in zip(members, scored, strict=True):
            job.record(i, logprob, tokens)
        return True

    def _run_guest_turn(self) -> bool:
        with self._cv:
            try:
                batch = self.guests.next_batch(lambda b: make_guest(self.engine, b, static=self.mode == "static"))
            except Exception as exc:  # e.g. its adapters could not be routed: its requests get the error
                log.exception("a generation could not start")
                failed, self.guests.running = self.guests.running, None
                for entry in failed.entries if failed else []:
                    entry.job.fail(exc)
                return True
        if batch is None:
            return False
        if batch.guest.take_turn():
            with self._cv:
                self.guests.finished()
            finish_guest(self.engine, batch)
        return True

    # ---- generation rows --------------------------------------------------------------------------
    def _admit(self) -> None:
        joining = self._take_waiting()
        if not joining:
            return
        if not pin(self.engine, list({id(r.job): r.job for r in joining}.values())):
            joining = [r for r in joining if not r.job.ended]
        for row in joining:
            row.adapter, row.key = pinned(row.job, row.row)
        if joining:
            self._finish(self.batch.admit(joining))

    def _take_waiting(self) -> list[ActiveRow]:
        """Waiting rows that fit, in arrival order (a row that does not fit waits, and so do those after it)."""
        m = self.engine.loaded
        joining: list[ActiveRow] = []
        with self._cv:
            while self._waiting and len(self.batch) + len(joining) < self.max_rows:
                entry = self._waiting[0]
                if entry.job.cancelled.is_set() or entry.job.ended:
                    self._waiting.popleft()
                    entry.job.abandon()
                    continue
                if entry.active is None:  # tokenised once, even if it waits for room several times
                    try:
                        ids = entry.row.prompt_ids or self.engine.token_ids(entry.row.text)
                        entry.active = ActiveRow(entry.job, entry.index, m.tokenizer, ids, m.is_seq2seq)
                    except Exception as exc:  # the request gets the error; the rows behind it go on
                        self._waiting.popleft()
                        entry.job.fail(exc)
                        continue
                row = entry.active
                crowded = len(self.batch) or joining
                if crowded and cost(self.batch.rows + joining + [row]) > self.max_tokens:
                    break
                self._waiting.popleft()
                joining.append(row)
        return joining

    def _drop_cancelled(self) -> None:
        gone = {row for row in self.batch.rows if row.job.cancelled.is_set()}
        for row in gone:
            row.job.abandon()
        self.batch.retire(gone)

    def _finish(self, ended: list[ActiveRow]) -> None:
        """Answer the rows that ended, after they left the batch (so a caller woken by its answer finds the
        loop's layers cleared when the batch emptied)."""
        answers = [(row, row.completion()) for row in ended]
        self.batch.retire(set(ended))
        for row, completion in answers:
            row.job.finish_row(row.index, completion)

    # ---- failures ------------------------------------------------------------------------------
    def _fail_running(self, exc: BaseException) -> None:
        for row in self.batch.rows:
            row.job.fail(exc)
        self.batch.rows, self.batch.state = [], None
        self.engine.slots.clear()

    def _fail_everything(self, exc: BaseException) -> None:
        self._fail_running(exc)
        with self._cv:
            for entry in [*self._waiting, *self.guests.waiting]:
                entry.job.fail(exc)
            self._waiting.clear()
            self.guests.waiting.clear()
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


