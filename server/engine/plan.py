"""The serving loop's policy, with no model in sight: each iteration `Policy.plan(view)` says what to do, the
scheduler carries it out (scheduler.py), the running batch runs the model (running_batch.py), and the output step
applies the tokens (output_step.py).

    Plan.other    at most one piece of work that is not the running batch: "call" (an engine call, e.g. a
                  validation loss), "score" (a /score chunk) or "background" (an /adapt training step) — calls
                  and score chunks take turns; a training step runs when neither is waiting and it is due
    Plan.admit    how many of the waiting requests' rows join, in arrival order: while rows (max_rows) and free
                  KV blocks allow (each row's prefill blocks, keeping one block per running row in reserve for the
                  next step); the first that does not fit waits and so do those behind it (no overtaking); a beam
                  search joins with all its beams or not at all; an empty batch always takes the first (a pool too
                  small for it preempts, never fails: running_batch.py)
                  Under load (the batch at least half full) rows that could join wait, up to one prefill's
                  duration (measured, averaged), for others to join with them: every join is a prefill forward of
                  its own, and when requests end and arrive at every step, prefilling one row per step took more of
                  the loop than decoding (`gather_joins`; the wait is at most GATHER_MAX_S, and the first prefill,
                  cold, is not counted). Rows join at once where the batch is lightly loaded (a
                  short request behind a few long ones is not delayed), where the joining rows fill the batch, and
                  where some waiting rows cannot join anyway
    Plan.decode   whether the running rows (with those admitted) take a decoding step

A training step is due at once when nothing was served for `grace_s` (the next request of a client usually
follows within it); while serving, after generation has had (1 - share) / share times as long as the last
training step took, so training still gets `share` of the loop and never crowds generation out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Other = Literal["call", "score", "background"]
TURNS: tuple[Other, ...] = ("call", "score")
GATHER_MAX_S = 0.1  # the longest a joinable row waits for others


@dataclass(frozen=True)
class RowCost:
    """What one waiting request's row takes when it joins: `rows` batch rows (k for a beam search) and the KV
    blocks of their prefill."""

    blocks: int
    rows: int = 1


@dataclass(frozen=True)
class LoopView:
    """What the policy sees of the loop at the start of an iteration."""

    running: int  # rows in the running batch
    waiting: Sequence[RowCost]  # waiting rows in arrival order (their costs once tokenised)
    free_blocks: int = 1 << 30  # KV blocks an allocation may take now (free, or cached and evictable)
    calls: int = 0  # engine calls queued
    score_chunks: int = 0  # /score work queued (any amount counts as one chunk to run)
    background: int = 0  # training steps queued
    now: float = 0.0  # monotonic seconds
    waited: float = 0.0  # seconds the oldest waiting row has waited


@dataclass(frozen=True)
class Plan:
    other: Other | None
    admit: int  # the first `admit` waiting rows join
    decode: bool


class Policy:
    def __init__(self, *, max_rows: int, background_share: float = 0.2, background_grace_s: float = 0.02,
                 gather_joins: bool = True):
        self.max_rows = max_rows
        self.gather_joins = gather_joins
        self.prefill_s = 0.0  # a joining prefill's duration, averaged (0: none measured yet)
        self.prefills = 0  # joining prefill forwards so far
        self.joined_rows = 0  # the rows they carried
        self.background_share = background_share
        self.background_grace_s = background_grace_s
        self._turn = 0
        self._last_served = float("-inf")  # when the loop last had generation or scoring to do
        self._background_after = 0.0  # before this, a busy loop runs no training step

    def plan(self, view: LoopView) -> Plan:
        admit = self.admissible(view.running, view.waiting, view.free_blocks)
        if admit and self._gathering(view, admit):
            admit = 0
        serving = bool(view.running or view.waiting or view.score_chunks)
        if serving:
            self._last_served = view.now
        return Plan(self._other(view), admit, bool(view.running) or admit > 0)

    def admissible(self, running: int, waiting: Sequence[RowCost], free_blocks: int) -> int:
        """How many waiting rows, in order, fit beside `running` rows with `free_blocks` KV blocks."""
        taken, rows, blocks = 0, running, 0
        for cost in waiting:
            crowded = rows > 0
            if crowded and rows + cost.rows > self.max_rows:
                break
            if crowded and blocks + cost.blocks + rows + cost.rows > free_blocks:  # one spare block per row
                break
            taken += 1
            rows += cost.rows
            blocks += cost.blocks
        return taken

    def _gathering(self, view: LoopView, admit: int) -> bool:
        """Should the `admit` rows that could join wait for more to join with them (see the module docstring)?"""
        if not self.gather_joins or view.running * 2 < self.max_rows or admit < len(view.waiting):
            return False
        if view.running + sum(cost.rows for cost in view.waiting[:admit]) >= self.max_rows:
            return False
        return view.waited < min(self.prefill_s, GATHER_MAX_S)

    def prefill_ran(self, seconds: float, rows: int) -> None:
        """Told how long a joining prefill of `rows` rows took (the first one, cold, is not timed)."""
        self.prefills += 1
        self.joined_rows += rows
        if self.prefills > 1:
            self.prefill_s = seconds if self.prefill_s == 0 else 0.8 * self.prefill_s + 0.2 * seconds

    def _other(self, view: LoopView) -> Other | None:
        waiting = {"call": view.calls > 0, "score": view.score_chunks > 0}
        for _ in TURNS:
            self._turn = (self._turn + 1) % len(TURNS)
            if waiting[TURNS[self._turn]]:
                return TURNS[self._turn]
        if view.background and self.background_wait(view) <= 0:
            return "background"
        return None

    def background_wait(self, view: LoopView) -> float:
        """Seconds before a training step may start (see the module docstring)."""
        if view.running or view.waiting or view.score_chunks:
            return max(0.0, self._background_after - view.now)
        return max(0.0, self._last_served + self.background_grace_s - view.now)

    def background_ran(self, started: float, ended: float) -> None:
        """Told how long a training step took: generation gets its share of the loop before the next one."""
        took = ended - started
        self._background_after = ended + took * (1 - self.background_share) / self.background_share
