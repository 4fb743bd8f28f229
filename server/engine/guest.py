"""A whole transformers `generate` call (beam search; the request-level "static" scheduler) run one decoding
step at a time between the serving loop's iterations, so it never holds the loop for a whole generation.

The call runs on a thread of its own, but only while the loop waits for it: the loop grants a turn, the guest
runs until its next decoding step is computed (a logits processor is its yield point), hands the turn back and
blocks. Exactly one of the two threads touches the model at any time.

    loop thread:   guest.take_turn()   -> the guest runs one step, or to its end; True once it has ended
    guest thread:  generate(..., logits_processor=[guest.yield_point])   # pauses after every forward
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from transformers import LogitsProcessor

T = TypeVar("T")


class Guest(Generic[T]):
    def __init__(self, run: Callable[[Guest[T]], T], *, on_resume: Callable[[], None] = lambda: None,
                 name: str = "guest"):
        """run(guest) performs the whole call, passing `guest.yield_point` to generate; on_resume() runs on the
        guest's thread at the start of each turn (e.g. to point the layers at its adapters again)."""
        self._run = run
        self.on_resume = on_resume  # may be replaced while the guest runs (e.g. per generate call)
        self._go = threading.Semaphore(0)
        self._back = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.done = False
        self.result: T | None = None
        self.error: BaseException | None = None
        self.yield_point = _YieldEachStep(self._pause)

    def take_turn(self) -> bool:
        """Let the guest run one step (called by the loop thread); True once it has ended."""
        if self.done:
            return True
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()
        self._go.release()
        self._back.acquire()
        return self.done

    def _pause(self) -> None:
        self._back.release()
        self._go.acquire()
        self.on_resume()

    def _main(self) -> None:
        self._go.acquire()
        try:
            self.on_resume()
            self.result = self._run(self)
        except BaseException as exc:  # reported to the loop, which answers the guest's requests with it
            self.error = exc
        finally:
            self.done = True
            self._back.release()


class _YieldEachStep(LogitsProcessor):
    """Called by generate once per step, after the forward: the guest's yield point. Scores pass unchanged."""

    def __init__(self, pause: Callable[[], None]):
        self.pause = pause

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.pause()
        return scores
