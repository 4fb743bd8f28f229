"""Per-row streaming out of one batched `generate` call (transformers' streamers assume one row).

generate() calls put(tokens) once with the prompt, then once per step with the new token of every row,
shape (N,) or (N, 1). Each row gets the text that can no longer change: decoded so far, cut at its
token limit and at a stop string, minus a tail that could still become the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.generation.streamers import BaseStreamer


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class RowStreamer(BaseStreamer):
    def __init__(self, tokenizer, sinks: list[Callable[[str], None] | None], limits: list[int],
                 stops: list[tuple[str, ...]], eos_token_id: int | None):
        self.tokenizer = tokenizer
        self.sinks, self.limits, self.stops = sinks, limits, stops
        self.eos = eos_token_id
        self.tokens: list[list[int]] = [[] for _ in sinks]
        self.sent = [0] * len(sinks)
        self.done = [sink is None for sink in sinks]
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.sinks), -1)[:, -1].tolist()):
            if not self.done[row]:
                self._advance(row, token)

    def end(self) -> None:
        pass  # the final flush is the caller's: it knows the finished text

    def _advance(self, row: int, token: int) -> None:
        if token == self.eos or len(self.tokens[row]) >= self.limits[row]:
            self.done[row] = True
            return
        self.tokens[row].append(token)
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        text, stopped = cut_at_stop(text, self.stops[row])
        if stopped:
            self.done[row] = True
        else:
            hold = max((len(s) - 1 for s in self.stops[row]), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")  # an incomplete multi-byte character
        if len(text) > self.sent[row]:
            self.sinks[row](text[self.sent[row]:])
            self.sent[row] = len(text)
