"""Where the serving loop's time goes: seconds per phase since start, for /metrics (mhr_loop_seconds_total).

Each phase ends with a `lap`, which charges the time since the previous lap to it: one clock read per phase.

    idle     waiting for work (and the queue's lock)
    plan     the policy's plan over the queues
    other    a /score chunk, a call or a training step; cancelled rows leaving
    prefill  joining rows: their adapters resolved, their prompts prefilled, their first tokens
    decode   one decoding step for the running rows: inputs, forward, sampling, stop rules (on a GPU it includes
             waiting for the card, read back with the tokens)
    answer   rows that ended answered, preempted rows queued again
"""

from __future__ import annotations

import time
from collections.abc import Callable

PHASES = ("idle", "plan", "other", "prefill", "decode", "answer")


class LoopClock:
    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._now = now
        self._last = now()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to `phase`."""
        now = self._now()
        self.seconds[phase] += now - self._last
        self._last = now
