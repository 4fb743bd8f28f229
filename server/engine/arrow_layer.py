"""Arrow inside one wrapped linear layer: per-token routing over the layer's library of J LoRAs.

    logits = |x @ Pᵀ| / temperature                 (T, J)     P: the prototypes (J, d_in)
    w      = softmax over each token's top_k logits  (T, J)     the others 0
    y     += s Σ_j w[t, j] (x A_j) B_j              (T, d_out) s = 1/r; outputs mixed, as Arrow does
as two matmuls over the library concatenated: x @ [Pᵀ | A_cat] (T, J + J·r) gives the similarities and the
low-rank projections at once; those scaled by w per block of r, then @ B_cat (J·r, d_out).
Rows of a batch that are not Arrow rows are left alone: an `ArrowRows` names the batch positions it routes
(None: every row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class ArrowWeights:
    """One layer's library, laid out for two matmuls: the prototypes ride along with the A_j in the first."""

    fused: torch.Tensor  # (d_in, J + J*r): [Pᵀ | A_1 | … | A_J]
    lora_b: torch.Tensor  # (J*r, d_out): B_j stacked
    experts: int
    rank: int
    scale: float

    @classmethod
    def of(cls, prototypes: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
           temperature: float = 1.0) -> ArrowWeights:
        """P (J, d_in), A (J, d_in, r), B (J, r, d_out) -> the concatenated layout; the prototypes are divided by
        the temperature (> 0) here, so |x·p/T| is the logit with no division per token."""
        experts, d_in, rank = lora_a.shape
        a_cat = lora_a.permute(1, 0, 2).reshape(d_in, experts * rank)  # (d_in, J*r)
        fused = torch.cat([prototypes.T / temperature, a_cat], dim=1)  # (d_in, J + J*r)
        b_cat = lora_b.reshape(experts * rank, lora_b.shape[-1])  # (J*r, d_out)
        return cls(fused, b_cat, experts, rank, scale)

    def to(self, dtype: torch.dtype) -> ArrowWeights:
        if self.fused.dtype == dtype:
            return self
        return ArrowWeights(self.fused.to(dtype), self.lora_b.to(dtype), self.experts, self.rank, self.scale)


class RoutingRecorder:
    """Sums each row's mean routing weights over its tokens, layer by layer, for the layers that read the
    prompt (`width` tokens per row, `mask` (N, width) marking the real ones); rows are positions in the batch."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.float()  # (N, Q)
        self.totals: dict[int, torch.Tensor] = {}  # row -> Σ over layers of its mean weights (J,)
        self.layers: dict[int, int] = {}
        self.per_layer: dict[str, dict[int, torch.Tensor]] = {}  # layer name -> row -> mean weights (J,)
        self.keep_layers = False

    def add(self, layer: str, rows: list[int], weights: torch.Tensor) -> None:
        """weights (n, T, J) of the batch rows `rows`; skipped unless T is the prompt's width."""
        if weights.shape[1] != self.mask.shape[1]:
            return
        mask = self.mask[rows].to(weights.device)  # (n, T)
        mean = (weights.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (n, J)
        for i, row in enumerate(rows):
            self.totals[row] = self.totals.get(row, 0) + mean[i].cpu()
            self.layers[row] = self.layers.get(row, 0) + 1
            if self.keep_layers:
                self.per_layer.setdefault(layer, {})[row] = mean[i].cpu()

    def average(self, row: int) -> torch.Tensor | None:
        """The row's weights averaged over its tokens and then over layers (J,); None if no layer saw it."""
        if row not in self.totals:
            return None
        return self.totals[row] / self.layers[row]


@dataclass(eq=False)
class ArrowRows:
    """Arrow for some rows of the coming batch at one layer."""

    weights: ArrowWeights  # built for the route's temperature
    top_k: int
    rows: list[int] | None = None  # batch positions (None: all)
    index: torch.Tensor | None = None  # the same, as a tensor on the layer's device
    name: str = ""
    recorder: RoutingRecorder | None = None


def routing_weights(x: torch.Tensor, prototypes: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """x (..., d_in), P (J, d_in) -> w (..., J): softmax of the top_k |x·p_j| / temperature, others 0."""
    return top_k_softmax(x @ prototypes.T / temperature, top_k)


def top_k_softmax(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """x·p_j / T (..., J) -> w (..., J)."""
    logits = logits.abs()
    if top_k >= logits.shape[-1]:
        return torch.softmax(logits, dim=-1)
    top, idx = logits.topk(top_k, dim=-1)  # (..., k)
    return torch.zeros_like(logits).scatter_(-1, idx, torch.softmax(top, dim=-1))


def weighted_low_rank(x: torch.Tensor, weights: ArrowWeights, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., d_in) -> (w_j (x A_j) side by side (..., J*r),  w (..., J)); @ B_cat gives Σ_j w_j (x A_j) B_j."""
    both = x @ weights.fused  # (..., J + J*r): x·p_j / T and x A_j in one matmul
    w = top_k_softmax(both[..., : weights.experts], top_k)  # (..., J)
    low = both[..., weights.experts:].unflatten(-1, (weights.experts, weights.rank)) * w[..., None]  # (..., J, r)
    return low.flatten(-2), w


def arrow_delta(x: torch.Tensor, weights: ArrowWeights, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., d_in) -> (s Σ_j w_j (x A_j) B_j  (..., d_out),  w (..., J))."""
    low, w = weighted_low_rank(x, weights, top_k)
    return (low @ weights.lora_b) * weights.scale, w


def add_arrow(out: torch.Tensor, x: torch.Tensor, groups: list[ArrowRows]) -> None:
    """out (N, T, d_out) or (N, d_out) += each group's Arrow delta for its rows, in place."""
    for group in groups:
        weights = group.weights
        if group.rows is None:
            low, w = weighted_low_rank(x, weights, group.top_k)  # (N, T, J*r)
            out.view(-1, out.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]), weights.lora_b, alpha=weights.scale)
            rows = list(range(x.shape[0]))
        else:
            if group.index is None or group.index.device != x.device:
                group.index = torch.tensor(group.rows, dtype=torch.long, device=x.device)
            low, w = weighted_low_rank(x.index_select(0, group.index), weights, group.top_k)
            out.index_add_(0, group.index, low @ weights.lora_b, alpha=weights.scale)
            rows = group.rows
        if group.recorder is not None:
            group.recorder.add(group.name, rows, w if w.dim() == 3 else w.unsqueeze(1))
