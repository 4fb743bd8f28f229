"""Generations the serving loop runs as guests (guest.py), one decoding step per turn:

    beam search (num_beams > 1), in either scheduler: rows of one call_key, at most `max_rows`, one guest at a time
    the "static" scheduler (request-level batching, kept to compare against): up to `max_rows` waiting rows,
        collected for up to `max_wait_s` after the first, run to the end of their longest row by transformers'
        generate, one batch at a time — what this server did before it had its own decoding loop
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING

from adapter_store import StoreError

from .generation import call_key, generate_rows
from .guest import Guest
from .pinning import pin, pinned
from .rows import Completion
from .sequence import WaitingRow

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)


@dataclass
class GuestBatch:
    entries: list[WaitingRow]
    guest: Guest[list[Completion]] | None = None

    def groups(self) -> list[list[WaitingRow]]:
        """Entries that can share one generate() call, in a stable order."""
        ordered = sorted(self.entries, key=lambda e: call_key(e.row.params))
        return [list(g) for _, g in groupby(ordered, key=lambda e: call_key(e.row.params))]


class GuestQueue:
    """Waiting rows and the guest batch now running (at most one)."""

    def __init__(self, max_rows: int, *, static: bool, max_wait_s: float = 0.0):
        self.max_rows = max_rows
        self.static = static
        self.max_wait_s = max_wait_s
        self.waiting: deque[WaitingRow] = deque()
        self.running: GuestBatch | None = None

    def __bool__(self) -> bool:
        return bool(self.waiting) or self.running is not None

    def add(self, entry: WaitingRow) -> None:
        self.waiting.append(entry)

    def wake_in(self) -> float | None:
        """Seconds until a collecting static batch is due (None: nothing to wait for)."""
        if self.running is not None or not self.waiting or not self.static:
            return None
        return max(0.0, self.waiting[0].arrived + self.max_wait_s - time.monotonic())

    def next_batch(self, make_guest: Callable[[GuestBatch], Guest]) -> GuestBatch | None:
        """Start the next batch when none runs and one is due; return the running batch."""
        self._drop_ended()
        if self.running is None and self.waiting and not self.wake_in():
            self.running = GuestBatch(self._take())
            self.running.guest = make_guest(self.running)
        return self.running

    def finished(self) -> None:
        self.running = None

    def _take(self) -> list[WaitingRow]:
        if self.static:  # anything waiting, in arrival order
            count = min(self.max_rows, len(self.waiting))
            return [self.waiting.popleft() for _ in range(count)]
        key = call_key(self.waiting[0].row.params)
        taken, kept = [], deque()
        while self.waiting:
            entry = self.waiting.popleft()
            if len(taken) < self.max_rows and call_key(entry.row.params) == key:
                taken.append(entry)
            else:
                kept.append(entry)
        self.waiting = kept
        return taken

    def _drop_ended(self) -> None:
        for entry in self.waiting:
            if entry.job.cancelled.is_set():
                entry.job.abandon()
        self.waiting = deque(e for e in self.waiting if not e.job.ended)


def make_guest(engine: Engine, batch: GuestBatch, *, static: bool) -> Guest:
    """The batch's generation as a guest of the loop: its rows' adapters pinned, its groups run one after the
    other, the layers pointed at a group's adapters again at every turn (the loop re-points them in between)."""
    pin(engine, list({id(e.job): e.job for e in batch.entries}.values()))
    return Guest(lambda guest: _run(engine, batch, guest, static), name="guest-generate")


def finish_guest(engine: Engine, batch: GuestBatch) -> None:
    """Answer the batch's requests (or fail them with the guest's error)."""
    guest = batch.guest
    engine.slots.clear()
    if guest.error is not None:
        if not isinstance(guest.error, StoreError):
            log.error("generation failed", exc_info=guest.error)
        for entry in batch.entries:
            entry.job.fail(guest.error)
        return
    for entry, completion, key in guest.result:
        completion.version = getattr(key, "version", None)
        entry.job.finish_row(entry.index, completion)


def _run(engine: Engine, batch: GuestBatch, guest: Guest, static: bool) -> list:
    m = engine.loaded
    results = []
    for group in batch.groups():
        live = [e for e in group if not e.job.ended]
        if not live:
            continue
        adapters = [pinned(e.job, e.row) for e in live]
        merged = static and len({id(a) for a, _ in adapters}) == 1 and engine.merge_single_task
        _point_layers(engine, adapters, merged)
        states = engine.slots.layer_states()
        guest.on_resume = (lambda p=adapters[0]: engine.slots.use_merged(*p)) if merged else (
            lambda s=states: engine.slots.restore(s))
        done = generate_rows(m.model, m.tokenizer, m.is_seq2seq, m.device, [e.row for e in live],
                             logits_processor=[guest.yield_point])
        results += [(e, c, key) for e, c, (_, key) in zip(live, done, adapters, strict=True)]
    return results


def _point_layers(engine: Engine, adapters: list, merged: bool) -> None:
    """Several adapters: stacks of the batch's own (never the loop's row pool); one: merged weights (static
    scheduler, which owns the model while it runs) or the shared mode (beam search beside the loop's batch)."""
    if len({id(a) for a, _ in adapters}) > 1:
        engine.slots.use_stacked([a for a, _ in adapters])
    elif merged:
        engine.slots.use_merged(*adapters[0])
    else:
        engine.slots.use_shared(adapters[0][0])
