"""A target nn.Linear wrapped once at load time so each forward adds each row's own task adapter.

    rows mode:    y[i] = base(x[i]) + s (x[i] @ A[i]) @ B[i]    A (N, d_in, r), B (N, r, d_out), s = 1/r
    shared mode:  y    = base(x)    + s (x @ A) @ B             one adapter for the whole batch
    merged mode:  y    = x @ (W + s (A @ B)ᵀ)ᵀ + bias           one adapter, merged once per batch into a
                                                                 temporary weight (W itself is never changed)
    off:          y    = base(x)
Nothing is routed here: A and B are the cached per-task adapters the engine set for this batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchedLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.scale = 1.0  # the adapter's 1/r, applied as the alpha of the fused matmul
        self.per_row = False
        self.merged: torch.Tensor | None = None  # (d_out, d_in) while a merged batch runs
        self._merge_buffer: torch.Tensor | None = None  # reused: no weight-sized allocation per batch
        self._expanded: tuple[int, torch.Tensor, torch.Tensor] | None = None

    # T5's feed-forward reads `.weight` of its output layer directly; expose the wrapped layer's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def set_rows(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        """A (N, d_in, r) and B (N, r, d_out): one adapter per row of the coming batches."""
        self.lora_a, self.lora_b, self.scale, self.per_row, self._expanded = lora_a, lora_b, scale, True, None

    def set_shared(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        """A (d_in, r) and B (r, d_out) for every row."""
        self.lora_a, self.lora_b, self.scale, self.per_row, self._expanded = lora_a, lora_b, scale, False, None

    def set_merged(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        """Merge A (d_in, r), B (r, d_out) into a temporary copy of the weight for the coming batch:
        no per-token adapter work at all (costs one weight-sized buffer while the batch runs)."""
        weight = self.base.weight  # (d_out, d_in)
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, updatable in and out of inference
            if self._merge_buffer is None or self._merge_buffer.dtype != weight.dtype:
                self._merge_buffer = torch.empty_like(weight)
            torch.addmm(weight, lora_b.T.to(weight.dtype), lora_a.T.to(weight.dtype), alpha=scale,
                        out=self._merge_buffer)
        self.merged = self._merge_buffer
        self.lora_a = self.lora_b = self._expanded = None

    def clear(self) -> None:
        self.lora_a = self.lora_b = self._expanded = self.merged = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            return F.linear(x, self.merged, self.base.bias)
        out = F.linear(x, self.base.weight, self.base.bias)  # the wrapped layer, without a second module call
        if self.lora_a is None:
            return out
        if not self.per_row:
            flat = x.reshape(-1, x.shape[-1])  # (N*T, d_in)
            out.view(-1, out.shape[-1]).addmm_(flat @ self.lora_a, self.lora_b, alpha=self.scale)
            return out
        a, b = self._rows(x.shape[0])
        x3, out3 = (x, out) if x.dim() == 3 else (x.unsqueeze(1), out.unsqueeze(1))  # (N, T, d)
        out3.baddbmm_(torch.bmm(x3, a), b, alpha=self.scale)  # out += s (x @ A[row]) @ B[row], in place: no copy
        return out

    def _rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for a batch of n; beam search runs n = rows * beams, each beam after its row."""
        if n == self.lora_a.shape[0]:
            return self.lora_a, self.lora_b
        if self._expanded is None or self._expanded[0] != n:
            repeat = n // self.lora_a.shape[0]
            if repeat * self.lora_a.shape[0] != n:
                raise RuntimeError(f"batch of {n} rows does not match {self.lora_a.shape[0]} adapter rows")
            self._expanded = (n, self.lora_a.repeat_interleave(repeat, 0), self.lora_b.repeat_interleave(repeat, 0))
        return self._expanded[1], self._expanded[2]


def wrap_linears(model: nn.Module, names: list[str]) -> dict[str, BatchedLoraLinear]:
    """Replace each named nn.Linear by a BatchedLoraLinear around it (once); return them by name."""
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if not isinstance(layer, BatchedLoraLinear):
            layer = BatchedLoraLinear(layer)
            setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped
