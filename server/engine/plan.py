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


@dataclass(frozen=True)
class Plan:
    other: Other | None
    admit: int  # the first `admit` waiting rows join
    decode: bool


class Policy:
    def __init__(self, *, max_rows: int, background_share: float = 0.2, background_grace_s: float = 0.02):
        self.max_rows = max_rows
        self.background_share = background_share
        self.background_grace_s = background_grace_s
        self._turn = 0
        self._last_served = float("-inf")  # when the loop last had generation or scoring to do
        self._background_after = 0.0  # before this, a busy loop runs no training step

    def plan(self, view: LoopView) -> Plan:
        admit = self.admissible(view.running, view.waiting, view.free_blocks)
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
