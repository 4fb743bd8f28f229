"""Arrow rows in a batch: what a row asking for Arrow carries, and pointing the wrapped layers at it.

An Arrow row's adapter is an `ArrowAdapter`: a TaskAdapter of zeros (so the rows / shared modes, the row pool and
the scheduler treat it as any row, adding nothing) that also carries the library and the request's top_k and
temperature. After the layers are pointed at a batch's plain adapters, `attach` adds each layer's Arrow routing
for the Arrow rows (arrow_layer.py), grouped by (library, spec):

    point the layers as usual (rows / shared; never merged when an Arrow row is in the batch)
    attach(slots, row adapters, start, end)      the layers also route Arrow rows [start, end) per token
A batch whose rows are all Arrow rows runs the bare backbone plus Arrow (no zero adapters multiplied).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from adapter_store import TaskAdapter
from adapter_store.arrow import ArrowLibrary, ArrowSpec

from .adapter_slots import AdapterSlots
from .arrow_layer import ArrowRows, ArrowWeights, RoutingRecorder
from .lora_layer import Active


class ArrowKey(NamedTuple):
    """Names what an Arrow row runs: its library's content key and the request's routing."""

    library: Hashable
    spec: ArrowSpec


@dataclass(frozen=True, eq=False)
class ArrowAdapter(TaskAdapter):
    """An Arrow row's adapter: zeros as a plain LoRA, plus the library it routes over per token."""

    library: ArrowLibrary | None = None
    spec: ArrowSpec | None = None
    layer_weights: dict[str, ArrowWeights] = field(default_factory=dict)

    @classmethod
    def of(cls, library: ArrowLibrary, spec: ArrowSpec) -> ArrowAdapter:
        zeros = library.zero_adapter()
        weights = {name: ArrowWeights.of(p, a, b, library.scale, spec.temperature)
                   for name, p, a, b in library.layers()}
        return cls(zeros.rank, zeros.scale, zeros.groups, library, spec, weights)

    @property
    def key(self) -> ArrowKey:
        return ArrowKey(self.library.key, self.spec)

    def experts_weights(self, weights: torch.Tensor) -> dict[str, float]:
        """(J,) -> {expert name: weight}, in the library's order."""
        return {name: float(w) for name, w in zip(self.library.experts, weights.tolist(), strict=True)}


def is_arrow(adapter: TaskAdapter | None) -> bool:
    return isinstance(adapter, ArrowAdapter)


def has_arrow(adapters: Sequence[TaskAdapter | None]) -> bool:
    return any(is_arrow(a) for a in adapters)


def attach(slots: AdapterSlots, adapters: Sequence[TaskAdapter | None], start: int = 0, end: int | None = None,
           recorder: RoutingRecorder | None = None) -> None:
    """The layers also route the Arrow rows among adapters[start:end] (positions relative to start)."""
    end = len(adapters) if end is None else end
    window = list(adapters[start:end])
    groups: dict[ArrowKey, list[int]] = {}
    for p, adapter in enumerate(window):
        if is_arrow(adapter):
            groups.setdefault(adapter.key, []).append(p)
    every_row = len(groups) == 1 and sum(len(rows) for rows in groups.values()) == len(window)
    firsts = {key: next(a for a in window if is_arrow(a) and a.key == key) for key in groups}
    for name, layer in slots.layers.items():
        routes = []
        for key, rows in groups.items():
            adapter = firsts[key]
            weights = adapter.layer_weights[name].to(layer.base.weight.dtype)  # T5's wo may stay float32
            routes.append(ArrowRows(weights, adapter.spec.k_of(len(adapter.library.experts)),
                                    None if every_row else rows, name=name, recorder=recorder))
        if layer.active is None:
            layer.active = Active()
        layer.active.arrow = routes or None


def only_arrow(slots: AdapterSlots, adapters: Sequence[TaskAdapter | None], start: int = 0, end: int | None = None,
               recorder: RoutingRecorder | None = None) -> None:
    """Every row is an Arrow row: the bare backbone plus Arrow (the zero adapters are not multiplied)."""
    slots.clear()
    attach(slots, adapters, start, end, recorder)


def point(slots: AdapterSlots, adapters: Sequence[TaskAdapter], keys: Sequence[Hashable], start: int, end: int,
          recorder: RoutingRecorder | None = None) -> bool:
    """The running batch's layers for rows [start, end) when Arrow rows are among them (else False: nothing
    done). Re-pointed only when the rows changed, or to record a prefill's routing."""
    window = adapters[start:end]
    if not has_arrow(window):
        return False
    applied = ("arrow", tuple(keys), start, end)
    if slots.applied == applied and recorder is None:
        return True
    if all(is_arrow(a) for a in window):
        only_arrow(slots, adapters, start, end, recorder)
    else:
        slots.use_rows(adapters, keys, start, end)
        attach(slots, adapters, start, end, recorder)
    slots.applied = applied
    return True


def recorder_for(adapters: Sequence[TaskAdapter | None], attention_mask: torch.Tensor) -> RoutingRecorder | None:
    """A recorder of a prefill's routing when some of its rows are Arrow rows (mask: the prompts' tokens)."""
    return RoutingRecorder(attention_mask.cpu()) if has_arrow(adapters) else None


def record_routing(rows: Sequence, recorder: RoutingRecorder) -> None:
    """Each Arrow row's routing over its prompt: {expert: its weight averaged over tokens, then layers}."""
    for p, row in enumerate(rows):
        average = recorder.average(p)
        if is_arrow(row.adapter) and average is not None:
            row.routing = row.adapter.experts_weights(average)


def stop_recording(slots: AdapterSlots) -> None:
    for layer in slots.layers.values():
        if layer.active is not None and layer.active.arrow:
            for route in layer.active.arrow:
                route.recorder = None
