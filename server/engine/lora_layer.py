"""A target nn.Linear wrapped once at load time so each forward adds each row's own task adapter.

    rows mode:    y[i] = base(x[i]) + s (x[i] @ A[i]) @ B[i]    given Aᵀ (N, r, d_in), B (N, r, d_out), s = 1/r
    shared mode:  y    = base(x)    + s (x @ A) @ B             one adapter for the whole batch
    merged mode:  y    = x @ (W + s (A @ B)ᵀ)ᵀ + bias           one adapter, merged into a weight-sized
                                                                 buffer (W itself is never changed); kept
                                                                 while batches of the same task follow
    off:          y    = base(x)
    + arrow:      y   += Arrow's per-token routing over a library of LoRAs, for some rows (arrow_layer.py); with
                  the rows or shared mode, or alone (lora_a None)
Nothing is routed here: A and B are the cached per-task adapters the engine set for this batch.
After `prepack`, base(x) and the merged matmul run on oneDNN's blocked copy of the weight (prepack.py) whenever
gradients are off; training steps keep using the plain weight.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .arrow_layer import ArrowRows, add_arrow
from .prepack import pack_weight, packed_linear


@dataclass(slots=True)
class Active:
    """What the coming batch adds; a plain object, so setting it per batch skips nn.Module.__setattr__."""

    lora_a: torch.Tensor | None = None  # rows: Aᵀ (N, r, d_in); shared: A (d_in, r)
    lora_b: torch.Tensor | None = None  # rows: (N, r, d_out); shared: (r, d_out)
    scale: float = 1.0  # the adapter's 1/r, applied as the alpha of the fused matmul
    per_row: bool = False
    merged: torch.Tensor | None = None  # (d_out, d_in) in merged mode
    merged_packed: bool = False  # merged is a oneDNN-packed weight
    expanded: tuple[int, torch.Tensor, torch.Tensor] | None = None  # rows repeated for beam search
    columns: tuple[torch.Tensor, torch.Tensor] | None = None  # (Aᵀ, its view A (N, d_in, r)): decoding steps
    arrow: list[ArrowRows] | None = None  # Arrow routing per token for some rows (never with merged)


class BatchedLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.active: Active | None = None
        self._merge_buffer: torch.Tensor | None = None  # reused: no weight-sized allocation per batch
        self._merged_key: Hashable | None = None  # whose merge the buffer holds (None: unknown, never reused)
        self.packed: torch.Tensor | None = None  # oneDNN's blocked copy of base.weight, once prepacked
        self._rows_hint = 16
        self._rows_cast: tuple[torch.Tensor, torch.Tensor] | None = None  # rows mode in another dtype: its buffers
        self._shared_held: tuple[torch.Tensor, torch.Tensor] | None = None  # shared mode in place (set_shared)

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
        """Aᵀ (N, r, d_in) and B (N, r, d_out): one adapter per row of the coming batches (row_pool.py)."""
        self.active = Active(*self._rows_in_weight_dtype(lora_a, lora_b), scale, per_row=True)

    def _rows_in_weight_dtype(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' adapters in the layer's dtype, copied into buffers of this layer that stay where they are (a
        captured CUDA graph reads them there), grown only for more rows."""
        dtype = self.base.weight.dtype
        if lora_a.dtype == dtype:
            return lora_a, lora_b
        self._rows_cast, kept = _kept_copy(self._rows_cast, lora_a, lora_b, dtype)
        return kept

    def set_shared(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *, in_place: bool = False
                   ) -> None:
        """A (d_in, r) and B (r, d_out) for every row. in_place: copied into buffers that stay where they are, so
        that a captured CUDA graph serves every task's shared batches (else one capture per task)."""
        if in_place:
            self._shared_held, (lora_a, lora_b) = _kept_copy(self._shared_held, lora_a, lora_b,
                                                             self.base.weight.dtype)
        else:
            lora_a, lora_b = self._in_weight_dtype(lora_a, lora_b)
        self.active = Active(lora_a, lora_b, scale)

    def _in_weight_dtype(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapters in the wrapped layer's dtype: a model may keep a layer in float32 under half precision (T5's
        wo: transformers' _keep_in_fp32_modules), and its inputs come in that dtype."""
        dtype = self.base.weight.dtype
        if lora_a.dtype == dtype:
            return lora_a, lora_b
        return lora_a.to(dtype), lora_b.to(dtype)

    def set_merged(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *, key: Hashable | None = None
                   ) -> None:
        """Merge A (d_in, r), B (r, d_out) into a weight-sized buffer for the coming batch: no per-token adapter
        work at all. The buffer is kept, and reused without merging while batches of the same key follow."""
        buffer = self._merge_buffer
        if key is None or key != self._merged_key or buffer is None or buffer.dtype != self.base.weight.dtype:
            buffer = self._merge_buffer = self._merge(lora_a, lora_b, scale)
            self._merged_key = key
        self.active = Active(merged=buffer, merged_packed=buffer.is_mkldnn)

    def _merge(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
        weight = self.base.weight  # (d_out, d_in)
        b_t, a_t = lora_b.T.to(weight.dtype), lora_a.T.to(weight.dtype)  # (d_out, r), (r, d_in)
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, updatable in and out of inference
            if self.packed is not None:
                packed = pack_weight(torch.addmm(weight, b_t, a_t, alpha=scale), self._rows_hint)
                if packed is not None:
                    return packed
            buffer = self._merge_buffer
            if buffer is None or buffer.is_mkldnn or buffer.dtype != weight.dtype:
                buffer = torch.empty_like(weight)
            return torch.addmm(weight, b_t, a_t, alpha=scale, out=buffer)

    def prepack(self, rows_hint: int) -> bool:
        """Keep oneDNN's blocked copy of the weight for inference matmuls; False where this CPU cannot."""
        self._rows_hint = rows_hint
        self.packed = pack_weight(self.base.weight, rows_hint)
        self._forget_merge()
        return self.packed is not None

    def unpack(self) -> None:
        self.packed = None
        self._forget_merge()

    def _forget_merge(self) -> None:
        self._merge_buffer, self._merged_key = None, None

    def clear(self) -> None:
        self.active = None

    def layout(self) -> tuple:
        """(mode, address and shape of each adapter tensor) of what the layer runs now."""
        active = self.active
        if active is None:
            return ()
        tensors = (active.lora_a, active.lora_b, active.merged)
        return (active.per_row, active.merged_packed, bool(active.arrow),
                *((t.data_ptr(), tuple(t.shape)) if t is not None else None for t in tensors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.active
        if active is not None and active.merged is not None:
            if active.merged_packed:  # merged mode is inference-only
                return packed_linear(x, active.merged, self.base.bias)
            return F.linear(x, active.merged, self.base.bias)
        if self.packed is not None and not torch.is_grad_enabled():
            out = packed_linear(x, self.packed, self.base.bias)
        else:
            out = F.linear(x, self.base.weight, self.base.bias)  # the wrapped layer, without a second module call
        if active is None:
            return out
        if active.lora_a is not None and not active.per_row:
            flat = x.reshape(-1, x.shape[-1])  # (N*T, d_in)
            out.view(-1, out.shape[-1]).addmm_(flat @ active.lora_a, active.lora_b, alpha=active.scale)
        elif active.lora_a is not None:
            a_t, b = _rows(active, x.shape[0])
            x3, out3 = (x, out) if x.dim() == 3 else (x.unsqueeze(1), out.unsqueeze(1))  # (N, T, d)
            # on the process's OpenMP team, not one thread: with one team alive (torch_threads.py) 16 tasks ran 8 %
            # faster in-process on the random T5 and the demo; the per-row reads are memory-bound, not launch-bound
            if x3.shape[1] == 1:  # a decoding step: 2 ops, not 4 (on a CPU 10.9 against 13.2 µs at d 512)
                low = torch.bmm(x3, _columns(active, a_t))  # (N, 1, r)
            else:  # longer inputs: Aᵀ's rows against x's columns is faster here (144 against 189 µs, T 32)
                low = torch.bmm(a_t, x3.transpose(1, 2)).transpose(1, 2)  # (N, T, r)
            out3.baddbmm_(low, b, alpha=active.scale)  # out += s (x @ A[row]) @ B[row]
        if active.arrow:  # Arrow rows: per-token routing over a library (arrow_layer.py)
            add_arrow(out, x, active.arrow)
        return out


def _kept_copy(held: tuple[torch.Tensor, torch.Tensor] | None, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype
               ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(a, b) copied, in `dtype`, into buffers that stay where they are (a captured CUDA graph reads them there):
    `held`, or new ones where it cannot take them (fewer leading rows, other shapes, dtype or device) -> (the
    buffers to keep, the views of them that hold a and b)."""
    rows = a.shape[0]
    if held is None or held[0].shape[0] < rows or held[0].shape[1:] != a.shape[1:] \
            or held[1].shape[1:] != b.shape[1:] or held[0].dtype != dtype or held[0].device != a.device:
        with torch.inference_mode(False), torch.no_grad():
            held = (a.new_empty(a.shape, dtype=dtype), b.new_empty(b.shape, dtype=dtype))
    kept = held[0][:rows], held[1][:rows]
    kept[0].copy_(a)
    kept[1].copy_(b)
    return held, kept


def _columns(active: Active, a_t: torch.Tensor) -> torch.Tensor:
    """A (N, d_in, r), a view of the rows' Aᵀ, made once while the batch's adapters stay (not once per layer call)."""
    held = active.columns
    if held is None or held[0] is not a_t:
        held = active.columns = (a_t, a_t.transpose(1, 2))
    return held[1]


def _rows(active: Active, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for a batch of n; beam search runs n = rows * beams, each beam after its row."""
    rows = active.lora_a.shape[0]
    if n == rows:
        return active.lora_a, active.lora_b
    if active.expanded is None or active.expanded[0] != n:
        repeat = n // rows
        if repeat * rows != n:
            raise RuntimeError(f"batch of {n} rows does not match {rows} adapter rows")
        active.expanded = (n, active.lora_a.repeat_interleave(repeat, 0), active.lora_b.repeat_interleave(repeat, 0))
    return active.expanded[1], active.expanded[2]


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
