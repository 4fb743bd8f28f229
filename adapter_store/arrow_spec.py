"""What an Arrow route asks for (`ArrowSpec`: over skills or tasks, top_k, temperature, granularity), validated,
and how a named Arrow task keeps it in its file's header (persistence.py: format "arrow", no tensors). The libraries
and the routing itself are in arrow.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import InventoryError
from .mix import MixError

Over = Literal["skills", "tasks"]
OVER: tuple[str, ...] = ("skills", "tasks")
Granularity = Literal["token", "prompt"]  # token: each token, per layer; prompt: once per request, from its prompt
GRANULARITY: tuple[str, ...] = ("token", "prompt")


class ArrowError(MixError):
    """An Arrow route that cannot be served; `field` names the part at fault (e.g. "top_k")."""


@dataclass(frozen=True)
class ArrowSpec:
    """What a request asks for: route over the skills or the tasks, keep the top_k (None: all); per token, or once
    per request from its prompt (server/engine/arrow_prompt.py)."""

    over: Over = "skills"
    top_k: int | None = 4
    temperature: float = 1.0
    granularity: Granularity = "token"

    def __post_init__(self):
        if self.over not in OVER:
            raise ArrowError(f"over must be one of {', '.join(OVER)}, not {self.over!r}", "over")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ArrowError(f"top_k must be an integer ≥ 1 (or null: all), not {self.top_k!r}", "top_k")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ArrowError(f"temperature must be a finite number > 0, not {self.temperature!r}", "temperature")
        if self.granularity not in GRANULARITY:
            raise ArrowError(f"granularity must be one of {', '.join(GRANULARITY)}, not {self.granularity!r}",
                             "granularity")

    @property
    def name(self) -> str:
        """A canonical, readable name: arrow(over=skills,top_k=4,temperature=1), with ",granularity=prompt" when
        routed once per request."""
        top_k = "all" if self.top_k is None else self.top_k
        once = ",granularity=prompt" if self.granularity == "prompt" else ""
        return f"arrow(over={self.over},top_k={top_k},temperature={self.temperature:.6g}{once})"

    def k_of(self, experts: int) -> int:
        return experts if self.top_k is None else min(self.top_k, experts)


# ---- a named Arrow task (persistence.py stores it as format "arrow", no tensors) ----------------------------
def route_of(spec: ArrowSpec) -> tuple[tuple[str, object], ...]:
    """The spec as TaskInfo.route: (("granularity", …), ("over", …), ("temperature", …), ("top_k", …))."""
    return tuple(sorted({"over": spec.over, "top_k": spec.top_k, "temperature": spec.temperature,
                         "granularity": spec.granularity}.items()))


def spec_of(route: tuple[tuple[str, object], ...]) -> ArrowSpec:
    """A route read back (one saved before granularity existed routes per token)."""
    return ArrowSpec(**dict(route))


def route_header(spec: ArrowSpec) -> str:
    return json.dumps(dict(route_of(spec)))


def read_route(path: Path, meta: dict[str, str]) -> tuple[tuple[str, object], ...]:
    """A named Arrow task's route from its file's header; InventoryError naming the key when unreadable."""
    try:
        return route_of(ArrowSpec(**json.loads(meta["route"])))
    except (KeyError, ValueError, TypeError, ArrowError) as exc:
        raise InventoryError(path, f"an Arrow task without a readable route ({exc})", key="route") from exc
