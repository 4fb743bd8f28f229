"""Byte-level encoding of (input, target) pairs and seeded sampling of mixed-task training batches."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from demo.tasks import apply, random_input, with_prefix

PAD_ID, EOS_ID, BYTE_OFFSET = 0, 1, 3  # ByT5: ids 0-2 are special, byte b has id b + 3
IGNORE = -100  # label id that the loss skips


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S) long, right-padded with PAD_ID
    attention_mask: torch.Tensor  # (B, S) long
    labels: torch.Tensor  # (B, T) long, ends with EOS_ID, padded with IGNORE
    task_ids: torch.Tensor  # (B,) long, index of each row's task in its task list


def encode_text(text: str) -> list[int]:
    """ByT5 ids of ``text`` followed by EOS (identical to ``ByT5Tokenizer()(text).input_ids``)."""
    return [b + BYTE_OFFSET for b in text.encode("utf-8")] + [EOS_ID]


def decode_ids(ids: list[int]) -> str:
    """Inverse of encode_text: stops at the first EOS and skips other special ids."""
    out = bytearray()
    for i in ids:
        if i == EOS_ID:
            break
        if i >= BYTE_OFFSET and i - BYTE_OFFSET < 256:
            out.append(i - BYTE_OFFSET)
    return out.decode("utf-8", errors="replace")


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)  # (B, width)


def make_batch(inputs: list[str], targets: list[str], task_ids: list[int]) -> Batch:
    """Encode parallel lists of inputs, targets and task indices into a padded Batch."""
    src = [encode_text(t) for t in inputs]
    tgt = [encode_text(t) for t in targets]
    input_ids = _pad(src, PAD_ID)
    return Batch(
        input_ids=input_ids,
        attention_mask=(input_ids != PAD_ID).long(),
        labels=_pad(tgt, IGNORE),
        task_ids=torch.tensor(task_ids, dtype=torch.long),
    )


class TaskMixSampler:
    """Endless, seeded batches drawn uniformly over ``tasks``; ``prefixed`` adds the instruction."""

    def __init__(self, tasks: list[str], batch_size: int, seed: int, prefixed: bool):
        self.tasks = tasks
        self.batch_size = batch_size
        self.prefixed = prefixed
        self.rng = random.Random(seed)

    def next(self) -> Batch:
        task_ids = [self.rng.randrange(len(self.tasks)) for _ in range(self.batch_size)]
        texts = [random_input(self.rng) for _ in task_ids]
        targets = [apply(self.tasks[t], x) for t, x in zip(task_ids, texts, strict=True)]
        if self.prefixed:
            texts = [with_prefix(self.tasks[t], x) for t, x in zip(task_ids, texts, strict=True)]
        return make_batch(texts, targets, task_ids)
