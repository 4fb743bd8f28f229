"""Arrow: zero-shot routing per token over a library of LoRAs (Ostapenko et al. 2024, "Towards Modular LLMs by
Building and Reusing a Library of LoRAs"; PEFT `tuners/lora/arrow.py`).

The library at each adapted layer is J LoRAs (A_j (d_in, r), B_j (r, d_out)), y = x ΔW with ΔW_j = A_j B_j:
    over "skills": the K skills; skill k's LoRA is the task whose MHR head weights are all one-hot(k):
                   A_k = [A[1,k]; …; A[H,k]] (rows stacked),  B_k = [B[1,k] | … | B[H,k]] (columns stacked)
    over "tasks":  the routed LoRA (A_t, B_t) of every pretrained and adapted task of the store
Prototype p_j (d_in,) = the top singular direction of ΔW_j in input space: the top LEFT singular vector of A_j B_j
(PEFT's top right singular vector of its B @ A, which is our ΔWᵀ). Computed without forming d_in × d_out:
    A = Q_a R_a,  Bᵀ = Q_b R_b   =>   A B = Q_a (R_a R_bᵀ) Q_bᵀ;   R_a R_bᵀ = U S Vᵀ (r × r)   =>   p = Q_a U[:, 0]
A token x then routes as (server/engine/arrow_layer.py):
    w = softmax(top_k(|x Pᵀ|) / temperature)  (others 0);   y += Σ_j w_j (x A_j) B_j / r   (outputs are mixed)
Libraries are cached by the inventory fingerprint and, over tasks, every member's (name, version, created): a
re-adapted task changes the key, so it can never be routed with a stale library.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .adapter import LayerGroup, TaskAdapter
from .arrow_spec import ArrowError, ArrowSpec, Over  # noqa: F401 - ArrowError, ArrowSpec: this module's API too
from .inventory import ModuleGroup

if TYPE_CHECKING:
    from .store import AdapterStore

LIBRARY_KINDS = ("pretrained", "adapted")  # tasks that join a library over tasks (not μ, not compositions)


@dataclass(frozen=True, eq=False)  # tensors: identity, not elementwise ==
class ArrowGroup:
    """Layers of one shape: layer i of `names` has J LoRAs and their prototypes."""

    names: tuple[str, ...]
    prototypes: torch.Tensor  # (L, J, d_in), unit rows
    lora_a: torch.Tensor  # (L, J, d_in, r)
    lora_b: torch.Tensor  # (L, J, r, d_out)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ArrowGroup:
        return ArrowGroup(self.names, *(t.to(device, dtype) for t in (self.prototypes, self.lora_a, self.lora_b)))


@dataclass(frozen=True, eq=False)
class ArrowLibrary:
    """J LoRAs per adapted layer and their prototypes; experts[j] names LoRA j (a skill or a task)."""

    over: Over
    experts: tuple[str, ...]
    rank: int
    scale: float  # 1 / r, as a task's adapter
    groups: tuple[ArrowGroup, ...]
    key: Hashable = None

    def layers(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (module path, P (J, d_in), A (J, d_in, r), B (J, r, d_out)) for every adapted module."""
        for group in self.groups:
            for i, name in enumerate(group.names):
                yield name, group.prototypes[i], group.lora_a[i], group.lora_b[i]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for g in self.groups for t in (g.prototypes, g.lora_a, g.lora_b))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ArrowLibrary:
        return ArrowLibrary(self.over, self.experts, self.rank, self.scale,
                            tuple(g.to(device, dtype) for g in self.groups), self.key)

    def zero_adapter(self) -> TaskAdapter:
        """A TaskAdapter of zeros in this library's layout, dtype and device (an Arrow row's plain-LoRA part)."""
        groups = tuple(LayerGroup(g.names, torch.zeros_like(g.lora_a[:, 0]), torch.zeros_like(g.lora_b[:, 0]))
                       for g in self.groups)
        return TaskAdapter(self.rank, self.scale, groups)




# ---- prototypes -----------------------------------------------------------------------------------
def top_input_directions(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """A (..., d_in, r), B (..., r, d_out) -> the top left singular vector of A @ B (..., d_in), unit norm, its
    largest-magnitude entry positive (a singular vector's sign is arbitrary; Arrow routes by |x·p|).
    Never forms d_in × d_out: QR of A and of Bᵀ, then an SVD of the r × r core R_a R_bᵀ."""
    a = lora_a.double()
    b = lora_b.double()
    q_a, r_a = torch.linalg.qr(a)  # (..., d_in, r), (..., r, r)
    _, r_b = torch.linalg.qr(b.transpose(-1, -2))  # Bᵀ = Q_b R_b: (..., r, r)
    u, _, _ = torch.linalg.svd(r_a @ r_b.transpose(-1, -2))  # core (..., r, r) = U S Vᵀ
    p = q_a @ u[..., :, :1]  # (..., d_in, 1)
    p = p.squeeze(-1)
    pivot = p.gather(-1, p.abs().argmax(dim=-1, keepdim=True))  # (..., 1)
    p = p * torch.where(pivot < 0, -1.0, 1.0)
    return p.to(lora_a.dtype)


def skill_loras(group: ModuleGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Each skill as one LoRA per layer: A (L, K, d_in, r) with heads' rows stacked, B (L, K, r, d_out) with heads'
    columns stacked (routing.mix_group with one-hot weights)."""
    skills, n_layers, heads, d_in_head, rank = group.lora_a.shape
    d_out_head = group.lora_b.shape[-1]
    a = group.lora_a.reshape(skills, n_layers, heads * d_in_head, rank)  # (K, L, d_in, r)
    b = group.lora_b.permute(0, 1, 3, 2, 4).reshape(skills, n_layers, rank, heads * d_out_head)  # (K, L, r, d_out)
    return a.transpose(0, 1).contiguous(), b.transpose(0, 1).contiguous()


def library_of_skills(store: AdapterStore) -> ArrowLibrary:
    inventory = store.inventory
    cfg = inventory.config
    groups = []
    for group in inventory.groups:
        a, b = skill_loras(group)
        groups.append(ArrowGroup(group.names, top_input_directions(a, b), a, b))
    experts = tuple(f"skill-{k}" for k in range(cfg.n_skills))
    return ArrowLibrary("skills", experts, cfg.r, 1.0 / cfg.r, tuple(groups), library_key(store, "skills"))


def library_tasks(store: AdapterStore) -> list[str]:
    """The tasks a library over tasks holds: pretrained and adapted ones (not μ, not compositions), by name."""
    return sorted(info.name for info in store.tasks() if info.kind in LIBRARY_KINDS)


def library_of_tasks(store: AdapterStore, names: list[str] | None = None) -> ArrowLibrary:
    """Every named task's LoRA as one expert; tasks stored as a plain LoRA of another rank are left out."""
    names = library_tasks(store) if names is None else names
    key = library_key(store, "tasks", names)
    cfg = store.inventory.config
    kept = [(name, adapter) for name, adapter in zip(names, store.adapters(names), strict=True)
            if adapter.rank == cfg.r]
    if not kept:
        raise ArrowError("the store holds no task to route over", "over")
    adapters = [adapter for _, adapter in kept]
    groups = []
    for g, first in enumerate(adapters[0].groups):
        a = torch.stack([adapter.groups[g].lora_a for adapter in adapters], dim=1)  # (L, J, d_in, r)
        b = torch.stack([adapter.groups[g].lora_b for adapter in adapters], dim=1)  # (L, J, r, d_out)
        groups.append(ArrowGroup(first.names, top_input_directions(a, b), a, b))
    return ArrowLibrary("tasks", tuple(name for name, _ in kept), cfg.r, 1.0 / cfg.r, tuple(groups), key)


def library_key(store: AdapterStore, over: Over, names: list[str] | None = None) -> Hashable:
    """Names a library's content: the inventory, and over tasks each member's (name, version, created)."""
    if over == "skills":
        return ("arrow", store.fingerprint, "skills")
    names = library_tasks(store) if names is None else names
    members = []
    for name in names:
        info = store.task(name)
        members.append((name, info.version, info.created))
    return ("arrow", store.fingerprint, "tasks", tuple(members))


class ArrowLibraries:
    """The libraries built so far, by key, on one device and dtype; a new key replaces the old one of its kind
    (a re-adapted task makes a new library over tasks; the old one is dropped)."""

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self._lock = threading.Lock()
        self._by_over: dict[str, ArrowLibrary] = {}
        self.builds = 0  # how many libraries were built (tests, metrics)

    def get(self, store: AdapterStore, over: Over) -> ArrowLibrary:
        key = library_key(store, over)
        with self._lock:
            found = self._by_over.get(over)
            if found is not None and found.key == key:
                return found
        if over == "skills":
            built = library_of_skills(store)
        else:
            built = library_of_tasks(store, [name for name, _, _ in key[3]])
        built = built.to(self.device, self.dtype)
        with self._lock:
            self._by_over[over] = built
            self.builds += 1
        return built

    def check(self, store: AdapterStore, spec: ArrowSpec) -> None:
        """ArrowError naming the field when the spec cannot be served by this store (top_k over the experts)."""
        experts = store.inventory.config.n_skills if spec.over == "skills" else len(library_tasks(store))
        if experts == 0:
            raise ArrowError("the store holds no task to route over", "over")
        if spec.top_k is not None and spec.top_k > experts:
            raise ArrowError(f"top_k={spec.top_k} is more than the {experts} {spec.over} to route over", "top_k")
