"""CPU weight prepacking: the wrapped linears' base matmul on oneDNN's blocked weight layout.

On CPU, `F.linear` runs MKL's sgemm on the plain (d_out, d_in) weight. oneDNN can instead reorder a weight once
into the blocked layout its kernels stream best; the matmul then reads it with no per-call repacking. This is
what inductor's CPU weight-pack pass and IPEX do. On this project's AMD EPYC (AVX2) VM a decode step of a d_model
512 T5 ran ~15-20 % faster (`bench/serving.py`, `ratio_prepacked_base_vs_bare`). But each oneDNN call costs
~50 µs of fixed overhead against ~15 µs for `F.linear`, so small weights run slower packed (the demo model,
d_model 128: 0.83× with every layer packed); by default only weights of at least 512 × 512 are packed.

The packed copy is inference-only: oneDNN's linear has no autograd kernel, so whenever gradients are on (an
/adapt training step) the layer uses the plain weight. That plain weight stays, so prepacking holds a second
copy of every packed weight (MHR_PREPACK_WEIGHTS=false turns it off); left to itself, the engine packs only
when the memory plan (memory_plan.py) has room for those copies. Rounding differs from MKL's by ~1e-6
relative: a different summation order, not a different result.
"""

from __future__ import annotations

import torch

MIN_PACKED_ELEMENTS = 512 * 512  # smaller weights lose more to oneDNN's per-call overhead than they gain


def worth_packing(weight: torch.Tensor) -> bool:
    return weight.numel() >= MIN_PACKED_ELEMENTS


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's fp32 CPU path; bf16 packing needs AVX-512 and is left to a trial pack."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_weight(weight: torch.Tensor, rows_hint: int) -> torch.Tensor | None:
    """weight (d_out, d_in) -> an opaque oneDNN tensor of the same shape, or None where this CPU cannot.
    rows_hint: the usual number of rows per matmul (a decode step's batch size), which picks the blocking."""
    try:
        with torch.inference_mode(False), torch.no_grad():  # usable in and out of inference mode
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
    except RuntimeError:  # e.g. bf16 on a CPU without AVX-512
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., d_in) @ packedᵀ + bias -> (..., d_out); no autograd (inference only)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
