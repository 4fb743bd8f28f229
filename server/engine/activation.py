"""Point every wrapped layer at the adapters of the batch about to run.

    with slots.activate(adapters_per_row):   # one TaskAdapter per row (the same object for rows of one task)
        model.generate(...)
One task in the batch -> merged (serving: W + ΔW in a temporary buffer) or shared mode (training: two small
matmuls per layer, differentiable); several -> per-row mode, where each
group's adapters are stacked in row order once per batch, (L, N, d_in, r), and layer i of the group gets
the contiguous slice [i]. The scale 1/r is applied inside the layers' fused matmuls (alpha), never copied.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from adapter_store import TaskAdapter

from .lora_layer import BatchedLoraLinear, wrap_linears


class AdapterSlots:
    def __init__(self, model: nn.Module, module_names: list[str]):
        self.layers: dict[str, BatchedLoraLinear] = wrap_linears(model, module_names)

    @contextmanager
    def activate(self, row_adapters: Sequence[TaskAdapter | None], *, merge: bool = False) -> Iterator[None]:
        """merge: a batch of one task runs on temporarily merged weights (inference only, not for training)."""
        try:
            self._set(row_adapters, merge)
            yield
        finally:
            self.clear()

    def clear(self) -> None:
        for layer in self.layers.values():
            layer.clear()

    def _set(self, row_adapters: Sequence[TaskAdapter | None], merge: bool) -> None:
        unique = list({id(a): a for a in row_adapters}.values())
        if len(unique) == 1:
            if unique[0] is not None:
                self._set_shared(unique[0], merge)
            return
        if any(a is None for a in unique):
            raise ValueError("a batch mixing rows with and without an adapter is not supported")
        if len({a.scale for a in unique}) != 1:
            raise ValueError("adapters in one batch must share one rank and scale")
        self._set_rows(list(row_adapters))

    def _set_shared(self, adapter: TaskAdapter, merge: bool) -> None:
        for group in adapter.groups:
            for i, name in enumerate(group.names):
                layer = self.layers[name]
                (layer.set_merged if merge else layer.set_shared)(group.lora_a[i], group.lora_b[i], adapter.scale)

    def _set_rows(self, row_adapters: list[TaskAdapter]) -> None:
        """Each group's adapters stacked in row order, one copy: (L, d_in, r) x N -> (L, N, d_in, r)."""
        first = row_adapters[0]
        for g, group in enumerate(first.groups):
            if any(a.groups[g].names != group.names for a in row_adapters):
                raise ValueError("adapters in one batch must come from the same inventory layout")
            a = torch.stack([row.groups[g].lora_a for row in row_adapters], dim=1)  # (L, N, d_in, r)
            b = torch.stack([row.groups[g].lora_b for row in row_adapters], dim=1)  # (L, N, r, d_out)
            for i, name in enumerate(group.names):
                self.layers[name].set_rows(a[i], b[i], first.scale)
