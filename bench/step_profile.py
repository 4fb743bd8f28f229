"""What one decoding step launches, per step: torch operators, device kernels (CUDA) and the operators that take the
most time — the evidence a short GPU lease needs to say why a step is slow (`bench/engine_core.py --only step
--profile K`; bench/gpu.sh runs it on a lent card).

Run on the thread that steps (the serving loop's): torch's profiler records the operators of the thread that runs
them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

WARM_STEPS = 3


def profile_steps(step: Callable[[], None], steps: int, top: int, device: str) -> dict:
    """step() run `steps` times under the profiler -> per-step counts and the `top` operators by self time."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(WARM_STEPS):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    operators = [e for e in events if e.key.startswith("aten::")]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    ranked = sorted(kernels if cuda else operators, key=_self_us, reverse=True)[:top]
    return {
        "operators_per_step": round(sum(e.count for e in operators) / steps, 1),
        "kernels_per_step": round(sum(e.count for e in kernels) / steps, 1) if cuda else None,
        "self_us_per_step": round(sum(_self_us(e) for e in (kernels if cuda else operators)) / steps, 1),
        "top": [{"name": e.key[:80], "calls_per_step": round(e.count / steps, 2),
                 "self_us_per_step": round(_self_us(e) / steps, 1)} for e in ranked],
    }


def _self_us(event) -> float:
    """Self time of an averaged event: on its device for a kernel, on the host for an operator (µs)."""
    if event.device_type == DeviceType.CUDA:
        return float(getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0))
    return float(event.self_cpu_time_total)
