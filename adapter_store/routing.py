"""The routing math of Poly / MHR (DESIGN.md), batched over all layers of one shape.

Per layer with H heads and K skills, for a task's logits z (H*K,):
    p = sigmoid(z.view(H, K));   w = p / (p.sum(-1, keepdim=True) + 1e-12)
    Ã_h = Σ_k w[h,k] A[h,k]  (d_in/H, r);   A_t = [Ã_1; …; Ã_H]  (d_in, r)   rows stacked
    B̃_h = Σ_k w[h,k] B[h,k]  (r, d_out/H);  B_t = [B̃_1 | … | B̃_H] (r, d_out) columns stacked
    y = base(x) + x @ A_t @ B_t / r
Parameters are mixed, not products: A_t B_t ≠ Σ_k w_k A_k B_k.
One task: K fused multiply-adds per group; U tasks at once: one batched matmul per group.
"""

from __future__ import annotations

import torch

from .adapter import LayerGroup, TaskAdapter
from .inventory import Inventory, ModuleGroup

EPS = 1e-12  # as PEFT's PolyRouter


def routing_weights(logits: torch.Tensor, n_splits: int, n_skills: int) -> torch.Tensor:
    """Logits (..., H*K) -> mixing weights (..., H, K); each head's weights sum to 1 (eval mode)."""
    p = torch.sigmoid(logits.reshape(*logits.shape[:-1], n_splits, n_skills))  # (..., H, K)
    return p / (p.sum(dim=-1, keepdim=True) + EPS)


def uniform_weights(n_layers: int, n_splits: int, n_skills: int) -> torch.Tensor:
    """The μ adapter's weights: 1/K for every skill of every head.  (L, H, K)"""
    return torch.full((n_layers, n_splits, n_skills), 1.0 / n_skills)


def mix_group(group: ModuleGroup, weights: torch.Tensor) -> LayerGroup:
    """Weights (L, H, K) -> the group's per-layer A_t (L, d_in, r) and B_t (L, r, d_out)."""
    skills, n_layers, heads, d_in_head, rank = group.lora_a.shape
    d_out_head = group.lora_b.shape[-1]
    w = weights.permute(2, 0, 1)[..., None, None]  # (K, L, H, 1, 1)
    a = _weighted_sum(group.lora_a, w)  # (L, H, d_in/H, r)
    b = _weighted_sum(group.lora_b, w)  # (L, H, r, d_out/H)
    lora_a = a.view(n_layers, heads * d_in_head, rank)  # heads' rows stacked: (L, d_in, r)
    lora_b = b.transpose(1, 2).reshape(n_layers, rank, heads * d_out_head)  # heads' columns stacked
    return LayerGroup(group.names, lora_a, lora_b)


def _weighted_sum(skills: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_k w[k] * skills[k]: one fused multiply-add per skill over a contiguous block (memory-bound)."""
    out = skills[0] * w[0]
    for k in range(1, skills.shape[0]):
        out.addcmul_(skills[k], w[k])
    return out


def mix_group_many(group: ModuleGroup, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of U tasks (U, L, H, K) -> A (U, L, d_in, r) and B (U, L, r, d_out), reading the skills once:
    per (layer, head), (U, K) @ (K, d*r) in one batched matmul over a strided view (no copy of the skills).
    (For one task, mix_group's K fused multiply-adds are faster: tiny matmuls have per-matrix overhead.)"""
    skills, n_layers, heads, d_in_head, rank = group.lora_a.shape
    d_out_head = group.lora_b.shape[-1]
    tasks = weights.shape[0]
    w = weights.permute(1, 2, 0, 3).reshape(n_layers * heads, tasks, skills)  # (L*H, U, K)
    a = torch.bmm(w, group.lora_a.view(skills, n_layers * heads, -1).transpose(0, 1))  # (L*H, U, d_in/H * r)
    b = torch.bmm(w, group.lora_b.view(skills, n_layers * heads, -1).transpose(0, 1))  # (L*H, U, r * d_out/H)
    # heads' rows of A stacked: (L, H, U, d_in/H, r) -> (U, L, d_in, r)
    a = a.view(n_layers, heads, tasks, d_in_head, rank).permute(2, 0, 1, 3, 4).reshape(
        tasks, n_layers, heads * d_in_head, rank)
    # heads' columns of B side by side: (L, H, U, r, d_out/H) -> (U, L, r, d_out)
    b = b.view(n_layers, heads, tasks, rank, d_out_head).permute(2, 0, 3, 1, 4).reshape(
        tasks, n_layers, rank, heads * d_out_head)
    return a, b


def routed_adapter(inventory: Inventory, logits: list[torch.Tensor]) -> TaskAdapter:
    """One task's adapter from its logits, one (L, H*K) tensor per module group of the inventory."""
    return routed_adapters(inventory, [z.unsqueeze(0) for z in logits])[0]


def routed_adapters(inventory: Inventory, logits: list[torch.Tensor]) -> list[TaskAdapter]:
    """U tasks' adapters at once, from logits per module group [(U, L, H*K), ...]."""
    cfg = inventory.config
    return adapters_from_weights(inventory, [routing_weights(z, cfg.n_splits, cfg.n_skills) for z in logits])


def adapters_from_weights(inventory: Inventory, weights: list[torch.Tensor]) -> list[TaskAdapter]:
    """U adapters at once, from normalised skill weights per module group [(U, L, H, K), ...] (tasks, mixes):
    each group's skills are read once for all U (the cost of routing is memory traffic, so this is several times
    cheaper)."""
    cfg = inventory.config
    tasks = weights[0].shape[0]
    if tasks == 1:
        groups = tuple(mix_group(g, w[0]) for g, w in zip(inventory.groups, weights, strict=True))
        return [TaskAdapter(cfg.r, 1.0 / cfg.r, groups)]
    mixed = [mix_group_many(g, w) for g, w in zip(inventory.groups, weights, strict=True)]
    return [
        TaskAdapter(cfg.r, 1.0 / cfg.r, tuple(LayerGroup(g.names, a[u], b[u])
                                              for g, (a, b) in zip(inventory.groups, mixed, strict=True)))
        for u in range(tasks)
    ]


def pretrained_logits(inventory: Inventory, row: int) -> list[torch.Tensor]:
    """The router row of a pretrained task, per module group: [(L, H*K), ...]."""
    return [group.logits[:, row] for group in inventory.groups]


def mu_adapter(inventory: Inventory) -> TaskAdapter:
    """The μ adapter: every head of every layer averages its K skills with weight 1/K."""
    cfg = inventory.config
    groups = tuple(
        mix_group(group, uniform_weights(len(group.names), cfg.n_splits, cfg.n_skills))
        for group in inventory.groups
    )
    return TaskAdapter(cfg.r, 1.0 / cfg.r, groups)
