"""Point every wrapped layer at the adapters of the batch about to run.

    with slots.activate(adapters_per_row):   # one TaskAdapter per row (the same object for rows of one task)
        model.generate(...)
One task in the batch -> merged (serving: W + ΔW in a temporary buffer) or shared mode (training: two small
matmuls per layer, differentiable); several -> per-row mode, where each
group's adapters are stacked once per batch: (L, U, d_in, r) -> index rows -> (L, N, d_in, r), and layer i
of the group gets the contiguous slice [i].
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
        position = {id(a): i for i, a in enumerate(unique)}
        index = torch.tensor([position[id(a)] for a in row_adapters])
        self._set_rows(unique, index)

    def _set_shared(self, adapter: TaskAdapter, merge: bool) -> None:
        for group in adapter.groups:
            b_scaled = group.lora_b * adapter.scale  # (L, r, d_out)
            for i, name in enumerate(group.names):
                layer = self.layers[name]
                (layer.set_merged if merge else layer.set_shared)(group.lora_a[i], b_scaled[i])

    def _set_rows(self, unique: list[TaskAdapter], index: torch.Tensor) -> None:
        for g, group in enumerate(unique[0].groups):
            if any(a.groups[g].names != group.names for a in unique):
                raise ValueError("adapters in one batch must come from the same inventory layout")
            device = group.lora_a.device
            rows = index.to(device)
            a = torch.stack([u.groups[g].lora_a for u in unique], dim=1)  # (L, U, d_in, r)
            b = torch.stack([u.groups[g].lora_b * u.scale for u in unique], dim=1)  # (L, U, r, d_out)
            a, b = a.index_select(1, rows), b.index_select(1, rows)  # (L, N, d_in, r), (L, N, r, d_out)
            for i, name in enumerate(group.names):
                self.layers[name].set_rows(a[i], b[i])
