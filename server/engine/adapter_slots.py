"""Point every wrapped layer at the adapters of the forward about to run.

    merged:   one task, inference: W + s·(A B)ᵀ in a weight-sized buffer per layer, kept while the same key follows;
              where it pays (merge_pays): on a CPU a merge writes and repacks every wrapped weight
    shared:   one adapter for every row, two small matmuls per layer (differentiable: training)
    rows:     the running batch: row p uses the adapter at position p of the RowPool (only new ones are copied)
    stacked:  any other batch mixing adapters (scoring, beam search): stacks of its own, one copy per forward
The scale 1/r is applied inside the layers' fused matmuls (alpha), never copied.
`applied` names what the layers hold now, so the serving loop re-points them only when its batch changed or
another forward ran in between.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from adapter_store import TaskAdapter

from .lora_layer import BatchedLoraLinear, wrap_linears
from .prepack import worth_packing
from .row_pool import RowPool, stacked


class AdapterSlots:
    def __init__(self, model: nn.Module, module_names: list[str], *, pool_rows: int = 64):
        self.layers: dict[str, BatchedLoraLinear] = wrap_linears(model, module_names)
        self.pool = RowPool(pool_rows)
        self.applied: Hashable | None = None  # what the layers hold now (None: nothing, or unknown)
        self.merged_key: Hashable | None = None  # whose merge the layers' buffers hold
        self.merge_after_row_steps = _merge_after_row_steps(self.layers.values())
        self._unmerged: dict[Hashable, int] = {}  # rows × steps each task ran unmerged since the last merge
        self._layout: tuple | None = None  # (applied, layout()) last worked out

    # ---- the modes ------------------------------------------------------------------------------
    def use_merged(self, adapter: TaskAdapter, key: Hashable) -> None:
        for name, a, b in adapter.layers():
            self.layers[name].set_merged(a, b, adapter.scale, key=key)
        self.applied = ("merged", key)
        self.merged_key = key
        self._unmerged.clear()

    def merge_pays(self, key: Hashable, row_steps: int) -> bool:
        """Whether merging this task's adapter pays, `row_steps` rows × tokens being still to come: at once where the
        buffers hold it already; else once what the task ran unmerged since the last merge and what is to come
        reach merge_after_row_steps (a merge costs a weight-sized write per layer, on a CPU a repack too; it saves
        the shared mode's two small matmuls per layer, row and step). Like renting skis until the rent paid would
        have bought them: never more than twice the best choice made knowing the future, and tasks that take
        turns in short requests no longer pay a merge each."""
        return key == self.merged_key or self._unmerged.get(key, 0) + row_steps >= self.merge_after_row_steps

    def ran_unmerged(self, key: Hashable, rows: int) -> None:
        """A single-task forward of `rows` rows ran in the shared mode (merge_pays)."""
        if len(self._unmerged) >= 1024 and key not in self._unmerged:
            self._unmerged.clear()  # bounded: many tasks, each rarely alone
        self._unmerged[key] = self._unmerged.get(key, 0) + rows

    def use_shared(self, adapter: TaskAdapter, key: Hashable | None = None, *, in_place: bool = False) -> None:
        """One adapter for every row: the layers read its tensors, or (in_place) copies in buffers of their own
        that stay put for the static step's captured graphs."""
        for name, a, b in adapter.layers():
            self.layers[name].set_shared(a, b, adapter.scale, in_place=in_place)
        self.applied = ("shared", key, in_place) if key is not None else None

    def use_rows(self, adapters: Sequence[TaskAdapter], keys: Sequence[Hashable], start: int = 0,
                 end: int | None = None) -> None:
        """Pool position p holds adapters[p] for every p < len(adapters); the layers run rows [start, end) (end may
        pass the adapters: padding rows of a static step, whatever their positions hold)."""
        end = len(adapters) if end is None else end
        _check_compatible(adapters)
        self.pool.sync(adapters, keys, positions=end)
        first = adapters[0]
        for g, group in enumerate(first.groups):
            a, b = self.pool.rows(g, start, end)  # Aᵀ (L, n, r, d_in), B (L, n, r, d_out)
            for i, name in enumerate(group.names):
                self.layers[name].set_rows(a[i], b[i], first.scale)
        self.applied = ("rows", tuple(keys), start, end)

    def use_stacked(self, adapters: Sequence[TaskAdapter]) -> None:
        _check_compatible(adapters)
        first = adapters[0]
        for g, group in enumerate(first.groups):
            a, b = stacked(adapters, g)  # Aᵀ (L, n, r, d_in), B (L, n, r, d_out)
            for i, name in enumerate(group.names):
                self.layers[name].set_rows(a[i], b[i], first.scale)
        self.applied = None

    def clear(self) -> None:
        for layer in self.layers.values():
            layer.clear()
        self.applied = None

    def layout(self) -> tuple:
        """Where each layer's adapter tensors are (addresses, shapes): a captured CUDA graph reads them there, so
        it may be replayed only while this is unchanged. Worked out again only when the layers were re-pointed."""
        if self.applied is None or self._layout is None or self._layout[0] != self.applied:
            self._layout = (self.applied, tuple(layer.layout() for layer in self.layers.values()))
        return self._layout[1]

    @contextmanager
    def activate(self, row_adapters: Sequence[TaskAdapter | None], *, key: Hashable | None = None,
                 merge: bool = False) -> Iterator[None]:
        """For one forward that is not the running batch: one adapter -> merged (with `merge` and a key: inference
        only) or shared; several -> stacks of its own; None -> the bare backbone. Cleared afterwards."""
        unique = list({id(a): a for a in row_adapters}.values())
        try:
            if len(unique) > 1:
                self.use_stacked(row_adapters)
            elif unique[0] is None:
                self.clear()
            elif merge and key is not None:
                self.use_merged(unique[0], key)
            else:
                self.use_shared(unique[0])
            yield
        finally:
            self.clear()

    # ---- CPU weight prepacking --------------------------------------------------------------------
    def prepack(self, rows_hint: int, *, every_layer: bool = False) -> int:
        """Run base matmuls on oneDNN's packed weights (prepack.py): the layers whose weights are large enough to
        gain, or every layer. Returns how many were packed: 0 where this CPU cannot pack (then none is)."""
        chosen = self._to_pack(every_layer)
        self.merged_key = None  # the layers forget their merges
        if all(layer.prepack(rows_hint) for layer in chosen):
            return len(chosen)
        self.unpack()
        return 0

    def bytes_to_merge(self) -> int:
        """The memory the merge buffers take: one copy of every wrapped weight."""
        return sum(layer.base.weight.nbytes for layer in self.layers.values())

    def bytes_to_pack(self, *, every_layer: bool = False) -> int:
        """The memory the packed copies would take."""
        return sum(layer.base.weight.nbytes for layer in self._to_pack(every_layer))

    def _to_pack(self, every_layer: bool) -> list[BatchedLoraLinear]:
        return [layer for layer in self.layers.values() if every_layer or worth_packing(layer.base.weight)]

    def unpack(self) -> None:
        self.merged_key = None
        for layer in self.layers.values():
            layer.unpack()


def _merge_after_row_steps(layers) -> int:
    """Rows × tokens after which merging a task's adapter pays: at once on a GPU (a merge is one fast addmm per
    layer); on a CPU about the mean wrapped weight's elements / 1024 — a merge writes and repacks every weight,
    while the shared mode's small matmuls cost about the same per row and step at any width. Measured with one
    OpenMP team: the random T5 of bench/serving.py (d 512, mean 0.46 M elements: 448) merges in 52 ms and saves
    0.12-0.3 ms per row-step (pays after 170-420); the demo (d 128: 28) 2.8 ms and 0.07-0.19 ms (15-42)."""
    weights = [layer.base.weight for layer in layers]
    if not weights or weights[0].device.type != "cpu":
        return 0
    return sum(w.numel() for w in weights) // len(weights) // 1024


def _check_compatible(adapters: Sequence[TaskAdapter | None]) -> None:
    if any(a is None for a in adapters):
        raise ValueError("a batch mixing rows with and without an adapter is not supported")
    first = adapters[0]
    if any(a.scale != first.scale for a in adapters):
        raise ValueError("adapters in one batch must share one rank and scale")
    layout = [g.names for g in first.groups]
    if any([g.names for g in a.groups] != layout for a in adapters):
        raise ValueError("adapters in one batch must come from the same inventory layout")
