"""Pre-training adapters on the frozen backbone: the MHR inventory (PEFT Poly) and LoRA baselines.

No instruction prefix reaches the model here: only ``task_ids`` (Poly routing) tell it the task.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from peft import LoraConfig, PolyConfig, get_peft_model

from demo.batches import Batch, TaskMixSampler
from demo.train_loop import LoopConfig, LoopResult, run_loop

TARGET_MODULES = ["q", "k", "v", "o", "wi", "wo"]


@dataclass
class InventoryHparams:
    r: int = 4
    n_skills: int = 8  # K
    n_splits: int = 4  # H (1 = Poly); must divide d_model and d_ff
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))
    adapter_lr: float = 1e-2
    router_lr: float = 1e-1
    batch_size: int = 32
    steps: int = 3500
    warmup_steps: int = 100


def poly_config(hp: InventoryHparams, n_tasks: int) -> PolyConfig:
    return PolyConfig(
        task_type="SEQ_2_SEQ_LM",
        r=hp.r,
        n_skills=hp.n_skills,
        n_splits=hp.n_splits,
        n_tasks=n_tasks,
        target_modules=list(hp.target_modules),
        poly_type="poly",
    )


def routed_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy with each row routed by its task id (Poly)."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=batch.labels,
        task_ids=batch.task_ids,
    )
    return out.loss


def shared_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy with no task information at all (one shared LoRA for every task)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    return out.loss


def _param_groups(model: torch.nn.Module, hp: InventoryHparams) -> list[dict]:
    """Router logits get their own (larger) learning rate; only trainable (adapter) params are included."""
    router, adapters = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (router if "poly_router" in name else adapters).append(param)
    groups = [{"params": adapters, "lr": hp.adapter_lr}]
    if router:
        groups.append({"params": router, "lr": hp.router_lr})
    return groups


def train_adapters(
    backbone: torch.nn.Module,
    peft_config,
    tasks: list[str],
    hp: InventoryHparams,
    seed: int,
    deadline: float | None = None,
    name: str = "inventory",
    prefixed: bool = False,
):
    """Wrap a deep copy of ``backbone`` with ``peft_config`` and train it on ``tasks`` without prefix
    (``prefixed``: with the backbone's instruction prefix in every input, an experiment; off for the demo).

    Returns (PEFT model in eval mode, LoopResult). The backbone's own weights stay frozen.
    """
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(backbone), peft_config)
    sampler = TaskMixSampler(tasks, hp.batch_size, seed * 104729 + 3, prefixed=prefixed)
    loss_fn = shared_loss if isinstance(peft_config, LoraConfig) else routed_loss
    cfg = LoopConfig(steps=hp.steps, warmup_steps=hp.warmup_steps, deadline=deadline, name=name)
    result: LoopResult = run_loop(model, _param_groups(model, hp), sampler.next, loss_fn, cfg)
    return model, result


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def routers(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every Poly layer's routing-logits parameter, (n_tasks, H*K) each."""
    return [p for name, p in model.named_parameters() if name.endswith("poly_router.default.module_logits")]


@contextmanager
def uniform_routing(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily route every task through the mu adapter: all logits 0, so w[h, k] = 1/K exactly."""
    saved = [p.detach().clone() for p in routers(model)]
    try:
        with torch.no_grad():
            for p in routers(model):
                p.zero_()
        yield
    finally:
        with torch.no_grad():
            for p, old in zip(routers(model), saved, strict=True):
                p.copy_(old)


def hparams_dict(hp: InventoryHparams) -> dict:
    return asdict(hp)
