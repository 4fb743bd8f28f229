"""Zero-training routing: a new task as the best mix of known ones (the /adapt method "retrieve", and the
starting point of mhr-z / poly-z with init "retrieve").

    loss_t = − Σ log p(target | input; adapter_t) / Σ target tokens     every task t in skill space, teacher-forced
                                                                        through the scoring path, in one batch
    keep the k lowest; weights c_t = softmax(−loss_t) over them; the new task = Σ c_t · (t's skill weights)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapter_store import Mix

from ..engine import Engine, ScoreRow
from .data import Example


@dataclass(frozen=True)
class Candidate:
    task: str
    loss: float  # mean negative log-likelihood per target token
    weight: float  # in the mix (0 for those not kept)


@dataclass(frozen=True)
class Retrieved:
    mix: Mix
    candidates: list[Candidate]  # every candidate, best first

    def as_dict(self) -> dict:
        return {"mix": {task: round(weight, 6) for task, weight in self.mix.members},
                "candidates": [{"task": c.task, "loss": round(c.loss, 6), "weight": round(c.weight, 6)}
                               for c in self.candidates]}


def candidate_tasks(engine: Engine) -> list[str]:
    """Every task with skill weights: pretrained, routing-adapted, composed, and __mu__ (not plain-LoRA tasks)."""
    store = engine.store
    return [t.name for t in store.tasks() if t.kind in ("pretrained", "mu") or t.recipe is not None
            or (t.kind == "adapted" and store.routing_logits(t.name) is not None)]


def retrieve(engine: Engine, examples: list[Example], k: int) -> Retrieved:
    tasks = candidate_tasks(engine)
    rows = [ScoreRow(task, e.input, [e.target]) for task in tasks for e in examples]
    scored = engine.score(rows)  # one job: its pairs run task by task, between decoding steps
    losses = {}
    for i, task in enumerate(tasks):
        mine = [s[0] for s in scored[i * len(examples): (i + 1) * len(examples)]]
        losses[task] = -sum(s.logprob_sum for s in mine) / max(sum(s.tokens for s in mine), 1)
    ranked = sorted(tasks, key=lambda t: losses[t])
    best = ranked[:k]
    top = min(losses[t] for t in best)
    exp = {t: math.exp(top - losses[t]) for t in best}  # softmax(−loss), shifted for stability
    total = sum(exp.values())
    weights = {t: exp[t] / total for t in best}
    return Retrieved(Mix.of(weights), [Candidate(t, losses[t], weights.get(t, 0.0)) for t in ranked])
