"""Mixtures of tasks in skill space. Every routed task is a point in skill space — per layer and head, its
normalised skill weights w_t (H, K) — so tasks mix exactly and cheaply there:

    w_mix[ℓ] = Σ_t c_t · w_t[ℓ]     c_t ≥ 0, normalised to Σ c_t = 1     (each head's weights still sum to 1)
then A, B of the mix are routed from w_mix as a task's are from its own weights (routing.mix_group). Tasks stored
as a plain LoRA (MHR-μ) have no skill weights and cannot join a mix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import StoreError

MAX_MIX_TASKS = 16


class MixError(StoreError, ValueError):
    """A mix that cannot be served; `field` names the part at fault (e.g. "mix.some-task")."""

    def __init__(self, message: str, field: str = "mix"):
        self.field = field
        super().__init__(message)


@dataclass(frozen=True)
class Mix:
    members: tuple[tuple[str, float], ...]  # (task, coefficient), sorted by task, coefficients summing to 1

    @classmethod
    def of(cls, weights: Mapping[str, float], max_tasks: int = MAX_MIX_TASKS) -> Mix:
        """Validate and normalise {task: weight}: weights ≥ 0 and finite, not all zero, at most max_tasks entries.
        Only proportions count: {a: 3e307, b: 1e307} is {a: 3, b: 1}. Zero weights are dropped, and so are weights
        that are zero next to the largest one (below it by more than a double's range, e.g. 1e-20 next to 1e308)."""
        if not weights:
            raise MixError("a mix needs at least one task")
        if len(weights) > max_tasks:
            raise MixError(f"{len(weights)} tasks in the mix; at most {max_tasks}")
        for task, weight in weights.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) \
                    or weight < 0:
                raise MixError(f"the weight of {task!r} must be a finite number ≥ 0, not {weight!r}", f"mix.{task}")
        return cls(tuple(sorted(normalised(weights).items())))

    @property
    def name(self) -> str:
        """A canonical, readable name: mix(a=0.7,b=0.3)."""
        return "mix(" + ",".join(f"{task}={c:.6g}" for task, c in self.members) + ")"

    def as_dict(self) -> dict[str, float]:
        return dict(self.members)


def normalised(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights (finite, ≥ 0) scaled to sum to 1, the zero ones left out. Divided by the largest first, so no sum
    overflows (1e308 + 1e308) and tiny weights keep their proportions (1e-308, subnormals)."""
    largest = max(float(w) for w in weights.values())
    if largest <= 0:
        raise MixError("the weights of a mix must not all be zero")
    scaled = {task: float(w) / largest for task, w in weights.items()}  # each in [0, 1], the largest exactly 1
    total = sum(scaled.values())  # in [1, len(weights)]: finite
    return {task: s / total for task, s in scaled.items() if s > 0}


TaskRef = str | Mix  # what a row asks to be served with: a task's name, or a mix
