"""The few-shot training loop: only the method's parameters learn. Each step's forward and backward run on the
engine's serving loop between decoding iterations, as background work that yields to generation
(Engine.train_step); the optimizer step runs here."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..engine import Engine, GenerateRow, SamplingParams
from .data import Example, make_batch, split
from .methods import AdaptMethod


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    learning_rate: float
    batch_size: int
    seed: int
    validation_fraction: float
    max_seconds: float
    max_new_tokens: int = 64
    overwrite: bool = False  # the task may replace an adapted task of its name
    init: str = "uniform"  # routing methods: "uniform", or "retrieve" (start from the best mix of known tasks)
    retrieve_k: int = 3  # tasks kept by retrieval


@dataclass
class Progress:
    step: int = 0
    loss: float | None = None
    validation_loss: float | None = None
    validation_exact_match: float | None = None
    stopped_early: str | None = None


class Cancelled(Exception):
    pass


def train(engine: Engine, method: AdaptMethod, examples: list[Example], config: TrainConfig, *,
          cancelled: Callable[[], bool], on_progress: Callable[[Progress], None]) -> Progress:
    train_set, val_set = split(examples, config.validation_fraction, config.seed)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(method.params, lr=config.learning_rate, weight_decay=0.0)
    progress, start = Progress(), time.monotonic()
    for step in range(1, config.steps + 1):
        if cancelled():
            raise Cancelled()
        if time.monotonic() - start > config.max_seconds:
            progress.stopped_early = f"time cap of {config.max_seconds:g} s reached after {step - 1} steps"
            break
        batch = rng.sample(train_set, min(config.batch_size, len(train_set)))
        progress.step, progress.loss = step, _train_step(engine, method, optimizer, batch)
        on_progress(progress)
    if val_set:
        progress.validation_loss, progress.validation_exact_match = evaluate(engine, method, val_set, config)
        on_progress(progress)
    return progress


def _train_step(engine: Engine, method: AdaptMethod, optimizer, examples: list[Example]) -> float:
    m = engine.loaded
    value = engine.train_step(method.adapter, make_batch(m.tokenizer, m.is_seq2seq, examples, m.device))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(value):
        raise FloatingPointError(f"the training loss became {value}; try a smaller learning_rate")
    return value


@torch.no_grad()
def evaluate(engine: Engine, method: AdaptMethod, examples: list[Example], config: TrainConfig) -> tuple[float, float]:
    """(loss, exact match of greedy outputs) on held-out examples with the current adapter."""
    m = engine.loaded
    adapter = method.adapter().to(m.device, m.dtype)
    loss = engine.loss(adapter, make_batch(m.tokenizer, m.is_seq2seq, examples, m.device))
    params = SamplingParams(max_new_tokens=config.max_new_tokens)
    outputs = engine.generate_with([adapter] * len(examples), [GenerateRow("", e.input, params) for e in examples])
    hits = sum(o.text.strip() == e.target.strip() for o, e in zip(outputs, examples, strict=True))
    return loss, hits / len(examples)
