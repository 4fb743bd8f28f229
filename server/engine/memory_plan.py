"""One memory plan at start-up, made before any optional buffer exists (as vLLM plans the weights first, then
the KV cache from what a utilisation fraction leaves).

    budget = fraction × limit    limit: CPU — the cgroup's memory limit or MemTotal, whichever is smaller (never
                                 MemAvailable: it counts page cache); CUDA — the card's total memory
    free   = budget − held       held: CPU — this process's resident memory, the loaded weights made resident
                                 first (a memory-mapped weight counts only once read);
                                 CUDA — everything allocated on the card (other processes included)
What is granted, in this order:
    row pool             max_batch_size adapters                      required: start-up fails if it does not fit
    copies asked for     merge buffers / prepacked weights set true    required: start-up fails naming the setting
    KV cache             max_batch_tokens positions                    clamped with a warning (to one longest row
                                                                       at least, else start-up fails)
    adapter cache        cache_bytes                                   clamped with a warning (it is the first to
                                                                       give way: it only costs misses)
    copies left to auto  prepacked weights, then merge buffers         each on only if it still fits, else off
    skills on device     the inventory's skills, float32 (GPU)          on only if it still fits, else routing runs
                                                                       on the host
Prepacked weights come first: they speed up every decoding step (CPU), the merge buffers only single-task ones.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .kv_pool import kv_layout
from .loader import ModelLoadError

log = logging.getLogger(__name__)
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


class MemoryPlanError(ModelLoadError):
    """The settings ask for more memory than the device has (or for a copy it cannot make): names the setting and
    the numbers; stops start-up."""


@dataclass(frozen=True)
class MemoryFigures:
    limit_bytes: int
    held_bytes: int
    source: str  # where the limit came from: "cgroup", "MemTotal", "cuda:0", "setting"


@dataclass(frozen=True)
class Demands:
    """What the settings and the model ask for, in bytes (None: not possible on this device)."""

    pool_bytes: int
    kv_bytes_per_position: int
    kv_positions: int
    min_kv_positions: int  # one row of max_input_tokens + max_new_tokens
    cache_bytes: int
    prepack_bytes: int | None
    prepack_wanted: bool | None  # None: auto
    merge_bytes: int
    merge_wanted: bool | None
    skills_bytes: int = 0  # a copy of the inventory's skills on the device, to route there (0: none, e.g. CPU)


@dataclass
class PlanItem:
    name: str
    bytes: int
    on: bool
    why: str


@dataclass
class MemoryPlan:
    figures: MemoryFigures
    fraction: float
    weights_bytes: int
    items: list[PlanItem] = field(default_factory=list)
    kv_positions: int = 0
    cache_bytes: int = 0
    prepack: bool = False
    merge: bool = False
    skills_on_device: bool = False

    @property
    def budget_bytes(self) -> int:
        return int(self.fraction * self.figures.limit_bytes)

    @property
    def planned_bytes(self) -> int:
        return self.figures.held_bytes + sum(item.bytes for item in self.items if item.on)

    def table(self) -> str:
        rows = [f"memory plan: {_gib(self.budget_bytes)} budget = {self.fraction:g} × {_gib(self.figures.limit_bytes)} "
                f"({self.figures.source}); held {_gib(self.figures.held_bytes)} (weights {_gib(self.weights_bytes)})"]
        rows += [f"  {item.name:<18} {_gib(item.bytes):>11}  {'on ' if item.on else 'off'}  {item.why}"
                 for item in self.items]
        rows.append(f"  planned {_gib(self.planned_bytes)} of {_gib(self.budget_bytes)}")
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {"limit_bytes": self.figures.limit_bytes, "limit_source": self.figures.source,
                "fraction": self.fraction, "budget_bytes": self.budget_bytes, "held_bytes": self.figures.held_bytes,
                "weights_bytes": self.weights_bytes, "planned_bytes": self.planned_bytes,
                "items": [asdict(item) for item in self.items]}


def plan_memory(figures: MemoryFigures, fraction: float, demands: Demands, weights_bytes: int) -> MemoryPlan:
    plan = MemoryPlan(figures, fraction, weights_bytes)
    free = plan.budget_bytes - figures.held_bytes
    kv_floor = demands.min_kv_positions * demands.kv_bytes_per_position

    def grant(name: str, nbytes: int, why: str) -> None:
        nonlocal free
        plan.items.append(PlanItem(name, nbytes, True, why))
        free -= nbytes

    if demands.pool_bytes + kv_floor > free:
        raise MemoryPlanError(
            f"max_batch_size: its row pool ({_gib(demands.pool_bytes)}) and one row's KV cache ({_gib(kv_floor)}) do "
            f"not fit in the {_gib(free)} left of {fraction:g} × {_gib(figures.limit_bytes)} after "
            f"{_gib(figures.held_bytes)} held; lower MHR_MAX_BATCH_SIZE or raise MHR_MEMORY_FRACTION")
    grant("row pool", demands.pool_bytes, "max_batch_size adapters, resident between steps")
    copies = [_Copy("prepacked weights", "prepack_weights", demands.prepack_bytes, demands.prepack_wanted,
                    "CPU: base matmuls on oneDNN's blocked weights"),
              _Copy("merge buffers", "merge_single_task", demands.merge_bytes, demands.merge_wanted,
                    "single-task batches on merged weights")]
    if demands.skills_bytes:  # auto only: no setting asks for it
        copies.append(_Copy("skills on device", None, demands.skills_bytes, None, "routing on the device",
                            otherwise="routing on the host"))
    for copy in (c for c in copies if c.wanted):
        advice = f"leave MHR_{copy.setting.upper()} unset (auto) or set it to false"
        if copy.nbytes is None:
            raise MemoryPlanError(f"{copy.setting}=true: {copy.name} are not possible on this device; {advice}")
        if copy.nbytes > free - kv_floor:
            raise MemoryPlanError(f"{copy.setting}=true: {copy.name} need {_gib(copy.nbytes)}, but "
                                  f"{_gib(max(free - kv_floor, 0))} is left (budget {_gib(plan.budget_bytes)} = "
                                  f"{fraction:g} × {_gib(figures.limit_bytes)}, held {_gib(figures.held_bytes)}); "
                                  f"{advice}")
        grant(copy.name, copy.nbytes, f"{copy.what} (asked for)")
    kv = min(demands.kv_positions, max(free // max(demands.kv_bytes_per_position, 1), demands.min_kv_positions))
    if kv < demands.kv_positions:
        log.warning("memory plan: max_batch_tokens clamped from %d to %d positions (%s left)", demands.kv_positions,
                    kv, _gib(free))
    plan.kv_positions = kv
    grant("KV cache", kv * demands.kv_bytes_per_position,
          f"{kv} positions (max_batch_tokens{'' if kv == demands.kv_positions else ', clamped'})")
    cache = min(demands.cache_bytes, max(free, 0))
    if cache < demands.cache_bytes:
        log.warning("memory plan: the adapter cache clamped from %s to %s (MHR_CACHE_BYTES)",
                    _gib(demands.cache_bytes), _gib(cache))
    plan.cache_bytes = cache
    grant("adapter cache", cache, "cache_bytes" + ("" if cache == demands.cache_bytes else ", clamped"))
    for copy in copies:
        name, nbytes, wanted = copy.name, copy.nbytes, copy.wanted
        if wanted is None and nbytes is not None and nbytes <= free:
            grant(name, nbytes, f"{copy.what} (auto: fits)")
        elif not wanted:
            why = ("off (set false)" if wanted is False else "off: not possible on this device" if nbytes is None
                   else f"off (auto): needs {_gib(nbytes)}, {_gib(max(free, 0))} left")
            why += f"; {copy.otherwise}" if copy.otherwise else ""
            plan.items.append(PlanItem(name, nbytes or 0, False, why))
            if wanted is None and nbytes is not None:
                log.info("memory plan: %s %s", name, why)
    plan.prepack, plan.merge, plan.skills_on_device = (
        any(i.on for i in plan.items if i.name == name)
        for name in ("prepacked weights", "merge buffers", "skills on device"))
    return plan


class _Copy(NamedTuple):
    """An optional copy the plan grants when asked for (setting true) or, left to auto, when it fits."""

    name: str
    setting: str | None  # the MHR_ setting that asks for it (None: auto only)
    nbytes: int | None  # None: not possible on this device
    wanted: bool | None
    what: str
    otherwise: str = ""  # what runs instead when it is off


def measure(device: torch.device, limit_override: int | None = None) -> MemoryFigures:
    """The device's memory and what is in use already (see the module docstring)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return MemoryFigures(limit_override or total, total - free, "setting" if limit_override else str(device))
    limit, source = _cpu_limit()
    return MemoryFigures(limit_override or limit, _resident_bytes(), "setting" if limit_override else source)


def make_resident(model: torch.nn.Module) -> None:
    """Read one element per memory page of every CPU weight, so that weights the loader memory-mapped from their
    file count in this process's resident memory before the plan is made. (transformers maps safetensors lazily: a
    T5-XL's 10.4 GiB of weights read as 0.5 GiB resident, the plan then granted prepacked copies that did not fit,
    and resident memory peaked at 93 % of the machine once the weights were read.)"""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel() and tensor.is_contiguous():
                tensor.reshape(-1)[:: max(1, 4096 // tensor.element_size())].sum()


def _cpu_limit() -> tuple[int, str]:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < total:
            return int(text), "cgroup"
    return total, "MemTotal"


def _resident_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the figure is in kB
    except OSError:
        pass
    return 0


def kv_bytes_per_position(config, dtype: torch.dtype) -> int:
    """Keys and values of one position in every decoder layer (a seq2seq model's encoder positions cost the same
    in the cross-attention caches)."""
    layers, heads, head_dim = kv_layout(config)
    return layers * 2 * heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.1f} MiB"
