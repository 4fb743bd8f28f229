"""Merge a task's adapter into a model's weights in place: W += (A B * scale)ᵀ.

The reference "base model + this task's adapter" in tests (serving merges into a separate buffer instead).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import TaskAdapter


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: TaskAdapter) -> None:
    modules = dict(model.named_modules())
    for name, a, b in adapter.layers():
        linear = modules[name]
        weight = linear.weight  # (d_out, d_in)
        delta = (a.to(weight.device, torch.float32) @ b.to(weight.device, torch.float32)).T  # (d_out, d_in)
        weight.add_((adapter.scale * delta).to(weight.dtype))

