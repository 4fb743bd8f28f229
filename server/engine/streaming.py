"""Per-row streaming out of one batched transformers `generate` call (its streamers assume one row); the
guest generations (beam search, the static scheduler) stream through it.

generate() calls put(tokens) once with the prompt, then once per step with the new token of every row,
shape (N,) or (N, 1). Each row's callback gets the text that can no longer change (see RowText).
"""

from __future__ import annotations

import torch
from transformers.generation.streamers import BaseStreamer

from .row_text import RowText
from .rows import GenerateRow


class RowStreamer(BaseStreamer):
    def __init__(self, tokenizer, rows: list[GenerateRow], eos_ids: frozenset[int]):
        self.rows = rows
        self.eos_ids = eos_ids
        self.texts = [RowText(tokenizer, row.params.stop) for row in rows]
        self.done = [row.on_text is None for row in rows]
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for index, token in enumerate(value.reshape(len(self.rows), -1)[:, -1].tolist()):
            if not self.done[index]:
                self._advance(index, token)

    def end(self) -> None:
        pass  # the final flush is the caller's: it knows the finished text

    def _advance(self, index: int, token: int) -> None:
        row, text = self.rows[index], self.texts[index]
        if (token in self.eos_ids and not row.params.ignore_eos) or len(text.tokens) >= row.params.max_new_tokens:
            self.done[index] = True
            return
        if text.add(token):
            self.done[index] = True
        piece = text.streamable()
        if piece:
            row.on_text(piece)
