"""Merge a task's adapter into a model's weights (W += (A B * scale)ᵀ) or take it out again.

The reference "base model + this task's adapter" for tests, and a single-task fast path.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import TaskAdapter


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: TaskAdapter, *, sign: float = 1.0) -> None:
    modules = dict(model.named_modules())
    for name, a, b in adapter.layers():
        linear = modules[name]
        weight = linear.weight  # (d_out, d_in)
        delta = (a.to(weight.device, torch.float32) @ b.to(weight.device, torch.float32)).T  # (d_out, d_in)
        weight.add_((sign * adapter.scale * delta).to(weight.dtype))


def unmerge_adapter(model: nn.Module, adapter: TaskAdapter) -> None:
    merge_adapter(model, adapter, sign=-1.0)
