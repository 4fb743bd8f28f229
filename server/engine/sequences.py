"""Prompt + continuation token sequences for causal LMs, right-padded, loss only on the continuation."""

from __future__ import annotations

import torch

IGNORE = -100  # label of positions that carry no loss


def join_prompts(prompts: list[list[int]], continuations: list[list[int]],
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, attention_mask), each (N, T): labels are the continuation tokens, IGNORE elsewhere."""
    width = max(len(p) + len(c) for p, c in zip(prompts, continuations, strict=True))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p): len(p) + len(c)] = torch.tensor(c)
        mask[i, : len(p) + len(c)] = 1
    return ids, labels, mask
