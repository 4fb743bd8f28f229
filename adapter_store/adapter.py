"""A task's adapter: one plain rank-r LoRA per adapted linear layer, y = base(x) + (x @ A @ B) * scale."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)  # tensors: identity, not elementwise ==
class LayerGroup:
    """Layers of one shape, stacked: layer i of `names` has A = lora_a[i], B = lora_b[i]."""

    names: tuple[str, ...]
    lora_a: torch.Tensor  # (L, d_in, r)
    lora_b: torch.Tensor  # (L, r, d_out)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LayerGroup:
        return LayerGroup(self.names, self.lora_a.to(device, dtype), self.lora_b.to(device, dtype))


@dataclass(frozen=True, eq=False)
class TaskAdapter:
    """The routed (or μ, or stored) LoRA of one task, for every adapted module of the base model."""

    rank: int
    scale: float  # 1 / r, as in PEFT's Poly layer
    groups: tuple[LayerGroup, ...]

    def layers(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """Yield (module path, A (d_in, r), B (r, d_out)) for every adapted module."""
        for group in self.groups:
            for i, name in enumerate(group.names):
                yield name, group.lora_a[i], group.lora_b[i]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.groups for t in (g.lora_a, g.lora_b))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TaskAdapter:
        return TaskAdapter(self.rank, self.scale, tuple(g.to(device, dtype) for g in self.groups))

    @classmethod
    def from_layers(cls, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> TaskAdapter:
        """Group per-layer (A (d_in, r), B (r, d_out)) pairs by shape (e.g. a stored MHR-μ LoRA)."""
        by_shape: dict[tuple, list[str]] = {}
        for name, (a, b) in layers.items():
            by_shape.setdefault((tuple(a.shape), tuple(b.shape)), []).append(name)
        groups = tuple(
            LayerGroup(
                tuple(names),
                torch.stack([layers[n][0] for n in names]),
                torch.stack([layers[n][1] for n in names]),
            )
            for names in by_shape.values()
        )
        return cls(rank, 1.0 / rank, groups)
