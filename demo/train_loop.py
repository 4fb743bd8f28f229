"""One small optimisation loop shared by the backbone, the inventory and the paper-table baselines."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from demo.batches import Batch


@dataclass
class LoopConfig:
    steps: int
    warmup_steps: int = 100
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    deadline: float | None = None  # time.monotonic() value after which training stops early
    log_every: int = 200
    name: str = "train"


@dataclass
class LoopResult:
    steps_done: int
    seconds: float
    final_loss: float  # mean loss over the last (up to) 100 steps
    log: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since last log)


def _lr_factor(step: int, cfg: LoopConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak over the planned steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def run_loop(
    model: torch.nn.Module,
    param_groups: list[dict],
    next_batch: Callable[[], Batch],
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor],
    cfg: LoopConfig,
) -> LoopResult:
    """AdamW with warmup + cosine decay and gradient clipping; each group keeps its own peak LR."""
    optimizer = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    peaks = [g["lr"] for g in optimizer.param_groups]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    start, recent, log, window = time.monotonic(), [], [], []
    step = 0
    for step in range(cfg.steps):
        if cfg.deadline is not None and time.monotonic() > cfg.deadline:
            break
        for group, peak in zip(optimizer.param_groups, peaks, strict=True):
            group["lr"] = peak * _lr_factor(step, cfg)
        loss = loss_fn(model, next_batch())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        optimizer.step()
        recent = (recent + [loss.item()])[-100:]
        window.append(recent[-1])
        if (step + 1) % cfg.log_every == 0:
            log.append((step + 1, sum(window) / len(window)))
            elapsed = time.monotonic() - start
            print(f"[{cfg.name}] step {step + 1}/{cfg.steps} loss {log[-1][1]:.4f} {elapsed:.0f}s", flush=True)
            window = []
    else:
        step = cfg.steps
    model.eval()
    final = sum(recent) / max(1, len(recent))
    return LoopResult(steps_done=step, seconds=time.monotonic() - start, final_loss=final, log=log)
