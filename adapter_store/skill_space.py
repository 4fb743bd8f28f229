"""Tasks as points in skill space: each routed task's normalised skill weights per layer and head, and those
of mixes and composed tasks (weighted sums of their members', see mix.py), resolved from the registry as it is
now — so a member's new version reaches every mix that holds it, and a member gone breaks it (409).

    weights(store, "reverse-upper")        [(L, H, K), ...] per module group
    weights(store, Mix.of({"a": .7, "b": .3}))
    key_members(store, recipe)             the members' cache keys, for the mix's own cache key
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import routing
from .errors import BrokenCompositionError, UnknownTaskError
from .mix import Mix, MixError, TaskRef
from .registry import AdapterKey

if TYPE_CHECKING:
    from .store import AdapterStore

Recipe = Sequence[tuple[str, float]]


def weights(store: AdapterStore, ref: TaskRef, seen: tuple[str, ...] = ()) -> list[torch.Tensor]:
    """Normalised skill weights per module group [(L, H, K), ...]. MixError for a task stored as a plain LoRA."""
    if isinstance(ref, Mix):
        return _mixed(store, ref.name, ref.members, seen)
    info = store.task(ref)
    cfg = store.inventory.config
    if info.kind == "mu":
        return [routing.uniform_weights(len(g.names), cfg.n_splits, cfg.n_skills) for g in store.inventory.groups]
    if info.recipe is not None:
        return _mixed(store, ref, info.recipe, seen)
    if info.route is not None:
        raise MixError(f"task {ref!r} is an Arrow route (each token routed over a library): it has no skill weights, "
                       "so it cannot join a skill-space mix", f"mix.{ref}")
    logits = store.routing_logits(ref)
    if logits is None:
        raise MixError(f"task {ref!r} is stored as a plain LoRA ({info.method}): it has no skill weights, so it "
                       "cannot join a skill-space mix", f"mix.{ref}")
    return [routing.routing_weights(z, cfg.n_splits, cfg.n_skills) for z in logits]


def key_members(store: AdapterStore, owner: str, recipe: Recipe, seen: tuple[str, ...] = ()) -> tuple:
    """((member key, weight), ...): a mix's key changes whenever a member's does."""
    members = []
    for task, weight in recipe:
        info = _member(store, owner, task, seen)
        nested = key_members(store, task, info.recipe, (*seen, owner)) if info.recipe is not None else ()
        members.append((AdapterKey(store.fingerprint, task, info.version, info.created, nested), weight))
    return tuple(members)


def _mixed(store: AdapterStore, owner: str, recipe: Recipe, seen: tuple[str, ...]) -> list[torch.Tensor]:
    total: list[torch.Tensor] | None = None
    for task, weight in recipe:
        _member(store, owner, task, seen)
        member = weights(store, task, (*seen, owner))
        total = [weight * w for w in member] if total is None else [t + weight * w for t, w in zip(total, member,
                                                                                                   strict=True)]
    return total


def _member(store: AdapterStore, owner: str, task: str, seen: tuple[str, ...]):
    if task == owner or task in seen:
        raise BrokenCompositionError(f"{owner!r} contains itself (through {task!r})")
    try:
        return store.task(task)
    except UnknownTaskError:
        raise BrokenCompositionError(f"{owner!r} uses task {task!r}, which no longer exists; compose it again "
                                     "without it (POST /tasks with overwrite) or delete it") from None
