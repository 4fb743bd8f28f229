"""Few-shot adaptation methods (mttl `pl_finetune.py`), one small class each behind a registry.

    mhr-z   a new logits row per layer, (L, H*K) per module group, initialised 0 (uniform); only logits train
    poly-z  one logit vector per layer shared by all heads, (L, K), expanded to every head
    mhr-mu  the averaged LoRA of each layer (w = 1/K), A (L, d_in, r) and B (L, r, d_out) both train;
            stored as a plain LoRA
Backbone and skills stay frozen in every method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from adapter_store import AdapterStore, LayerGroup, TaskAdapter, TaskInfo


class AdaptMethod(ABC):
    name: str
    default_learning_rate: float

    def __init__(self, store: AdapterStore):
        self.store = store
        self.params = nn.ParameterList(self.initial_parameters())

    @abstractmethod
    def initial_parameters(self) -> list[nn.Parameter]: ...

    @abstractmethod
    def adapter(self) -> TaskAdapter:
        """The current adapter, differentiable with respect to `self.params`."""

    @abstractmethod
    def save(self, task: str, *, overwrite: bool = False) -> TaskInfo: ...

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def start_from(self, weights: list[torch.Tensor]) -> None:
        """Start from given normalised skill weights per group [(L, H, K), ...] instead of uniform routing
        (init "retrieve"); only routing methods can."""
        raise ValueError(f"{self.name} does not train routing logits: it cannot start from a mix")


class MhrZ(AdaptMethod):
    name, default_learning_rate = "mhr-z", 0.1

    def initial_parameters(self) -> list[nn.Parameter]:
        cfg = self.store.inventory.config
        width = cfg.n_splits * cfg.n_skills
        return [nn.Parameter(torch.zeros(len(g.names), width)) for g in self.store.inventory.groups]

    def logits(self) -> list[torch.Tensor]:
        return list(self.params)  # [(L, H*K), ...]

    def adapter(self) -> TaskAdapter:
        return self.store.adapter_for_logits(self.logits())

    def save(self, task: str, *, overwrite: bool = False) -> TaskInfo:
        return self.store.save_routing(task, self.name, [z.detach() for z in self.logits()], overwrite=overwrite)

    def start_from(self, weights: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for z, w in zip(self.params, weights, strict=True):
                z.copy_(logits_for(w).flatten(1))  # (L, H, K) -> (L, H*K)


class PolyZ(MhrZ):
    name, default_learning_rate = "poly-z", 0.1

    def initial_parameters(self) -> list[nn.Parameter]:
        skills = self.store.inventory.config.n_skills
        return [nn.Parameter(torch.zeros(len(g.names), skills)) for g in self.store.inventory.groups]

    def logits(self) -> list[torch.Tensor]:
        heads = self.store.inventory.config.n_splits
        return [z.repeat(1, heads) for z in self.params]  # (L, K) -> (L, H*K): every head the same row

    def start_from(self, weights: list[torch.Tensor]) -> None:
        with torch.no_grad():  # one vector for all heads: the heads' average weights
            for z, w in zip(self.params, weights, strict=True):
                z.copy_(logits_for(w.mean(dim=1)))  # (L, H, K) -> (L, K)


class MhrMu(AdaptMethod):
    name, default_learning_rate = "mhr-mu", 1e-3

    def initial_parameters(self) -> list[nn.Parameter]:
        mu = self.store.adapter("__mu__")
        self._layout = mu
        return [nn.Parameter(t.clone()) for g in mu.groups for t in (g.lora_a, g.lora_b)]

    def adapter(self) -> TaskAdapter:
        groups = tuple(
            LayerGroup(g.names, self.params[2 * i], self.params[2 * i + 1]) for i, g in enumerate(self._layout.groups)
        )
        return TaskAdapter(self._layout.rank, self._layout.scale, groups)

    def save(self, task: str, *, overwrite: bool = False) -> TaskInfo:
        adapter = self.adapter()
        detached = tuple(LayerGroup(g.names, g.lora_a.detach(), g.lora_b.detach()) for g in adapter.groups)
        return self.store.save_lora(task, self.name, TaskAdapter(adapter.rank, adapter.scale, detached),
                                    overwrite=overwrite)


def logits_for(weights: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """Logits whose normalised sigmoids equal the weights (..., K): p = w / max(w) / 2 (so 0 < p ≤ 1/2),
    z = log(p / (1 − p)); then p / Σ p = w. Weights below `floor` (relative) are raised to it."""
    p = 0.5 * (weights / weights.amax(dim=-1, keepdim=True)).clamp(min=floor)
    return torch.log(p / (1 - p))


METHODS: dict[str, type[AdaptMethod]] = {cls.name: cls for cls in (MhrZ, PolyZ, MhrMu)}
