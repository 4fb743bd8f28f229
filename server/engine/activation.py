"""Point every wrapped layer at the adapters of the batch about to run.

    with slots.activate(adapters_per_row, keys=cache_keys) as order:   # one TaskAdapter per row
        run the rows in `order` (position p of the batch runs input row order[p])
One task in the batch -> merged (serving: W + ΔW in a weight-sized buffer, kept while the same task key
follows) or shared mode (training: two small matmuls per layer, differentiable); several -> per-row mode on
the stacks of a RowPool, which keeps adapters in place between batches: a row runs at a position that already
holds its adapter when it can, so `order` may differ from the input order. The scale 1/r is applied inside
the layers' fused matmuls (alpha), never copied. A key of None means "never reuse" (e.g. an adapter still
being trained, whose tensors change in place).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from adapter_store import TaskAdapter

from .lora_layer import BatchedLoraLinear, wrap_linears
from .prepack import worth_packing
from .row_pool import RowPool


class AdapterSlots:
    def __init__(self, model: nn.Module, module_names: list[str], *, pool_rows: int = 64):
        self.layers: dict[str, BatchedLoraLinear] = wrap_linears(model, module_names)
        self.pool = RowPool(pool_rows)

    @contextmanager
    def activate(self, row_adapters: Sequence[TaskAdapter | None], *, keys: Sequence[Hashable | None] | None = None,
                 merge: bool = False) -> Iterator[list[int]]:
        """merge: a batch of one task runs on merged weights (inference only, not for training).
        Yields the order in which to run the rows."""
        keys = list(keys) if keys is not None else [None] * len(row_adapters)
        try:
            yield self._set(list(row_adapters), keys, merge)
        finally:
            self.clear()

    def prepack(self, rows_hint: int, *, every_layer: bool = False) -> int:
        """Run base matmuls on oneDNN's packed weights (prepack.py): the layers whose weights are large enough to
        gain, or every layer. Returns how many were packed: 0 where this CPU cannot pack (then none is)."""
        chosen = self._to_pack(every_layer)
        if all(layer.prepack(rows_hint) for layer in chosen):
            return len(chosen)
        self.unpack()
        return 0

    def bytes_to_pack(self, *, every_layer: bool = False) -> int:
        """The memory the packed copies would take."""
        return sum(layer.base.weight.nbytes for layer in self._to_pack(every_layer))

    def _to_pack(self, every_layer: bool) -> list[BatchedLoraLinear]:
        return [layer for layer in self.layers.values() if every_layer or worth_packing(layer.base.weight)]

    def unpack(self) -> None:
        for layer in self.layers.values():
            layer.unpack()

    def clear(self) -> None:
        for layer in self.layers.values():
            layer.clear()
        self.pool.release()

    def _set(self, row_adapters: list[TaskAdapter | None], keys: list[Hashable | None], merge: bool) -> list[int]:
        unique = list({id(a): a for a in row_adapters}.values())
        if len(unique) == 1:
            if unique[0] is not None:
                self._set_shared(unique[0], keys[0], merge)
            return list(range(len(row_adapters)))
        if any(a is None for a in unique):
            raise ValueError("a batch mixing rows with and without an adapter is not supported")
        if len({a.scale for a in unique}) != 1:
            raise ValueError("adapters in one batch must share one rank and scale")
        if any(a.groups[g].names != group.names for a in unique for g, group in enumerate(unique[0].groups)):
            raise ValueError("adapters in one batch must come from the same inventory layout")
        return self._set_rows(row_adapters, keys)

    def _set_shared(self, adapter: TaskAdapter, key: Hashable | None, merge: bool) -> None:
        for group in adapter.groups:
            for i, name in enumerate(group.names):
                layer = self.layers[name]
                if merge:
                    layer.set_merged(group.lora_a[i], group.lora_b[i], adapter.scale, key=key)
                else:
                    layer.set_shared(group.lora_a[i], group.lora_b[i], adapter.scale)

    def _set_rows(self, row_adapters: list[TaskAdapter], keys: list[Hashable | None]) -> list[int]:
        order = self.pool.place(row_adapters, keys)
        first = row_adapters[0]
        for g, group in enumerate(first.groups):
            a, b = self.pool.rows(g)  # (L, n, d_in, r), (L, n, r, d_out)
            for i, name in enumerate(group.names):
                self.layers[name].set_rows(a[i], b[i], first.scale)
        return order
