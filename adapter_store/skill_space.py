"""Tasks as points in skill space: each routed task's normalised skill weights per layer and head, and those
of mixes and composed tasks (weighted sums of their members', see mix.py), resolved from the registry as it is
now — so a member's new version reaches every mix that holds it, and a member gone breaks it (409).

    space = SkillSpace(registry, logits_of)       # logits_of(name): a routed task's logits, None for a plain LoRA
    space.weights("reverse-upper")                # [(L, H, K), ...] per module group
    space.weights(Mix.of({"a": .7, "b": .3}))
    space.key_members("ab", recipe)               # the members' cache keys, for the mix's own cache key
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import routing
from .errors import BrokenCompositionError, BrokenTaskError, UnknownTaskError
from .mix import Mix, MixError, TaskRef
from .registry import AdapterKey, TaskInfo
from .task_registry import TaskRegistry

Recipe = Sequence[tuple[str, float]]
AGAIN = "compose it again without it (POST /tasks with overwrite) or delete it"
LogitsOf = Callable[[str], "list[torch.Tensor] | None"]


class SkillSpace:
    def __init__(self, registry: TaskRegistry, logits_of: LogitsOf):
        self.registry = registry
        self.inventory = registry.inventory
        self.logits_of = logits_of

    def weights(self, ref: TaskRef, seen: tuple[str, ...] = ()) -> list[torch.Tensor]:
        """Normalised skill weights per module group [(L, H, K), ...]. MixError for a task stored as a plain
        LoRA."""
        if isinstance(ref, Mix):
            return self._mixed(ref.name, ref.members, seen)
        info = self.registry.task(ref)
        cfg = self.inventory.config
        if info.kind == "mu":
            return [routing.uniform_weights(len(g.names), cfg.n_splits, cfg.n_skills) for g in self.inventory.groups]
        if info.recipe is not None:
            return self._mixed(ref, info.recipe, seen)
        if info.kind == "base":
            raise MixError(f"task {ref!r} is the backbone with no adapter: it has no skill weights, so it cannot join "
                           "a skill-space mix", f"mix.{ref}")
        if info.route is not None:
            raise MixError(f"task {ref!r} is an Arrow route (each token routed over a library): it has no skill "
                           "weights, so it cannot join a skill-space mix", f"mix.{ref}")
        logits = self.logits_of(ref)
        if logits is None:
            raise MixError(f"task {ref!r} is stored as a plain LoRA ({info.method}): it has no skill weights, so it "
                           "cannot join a skill-space mix", f"mix.{ref}")
        return [routing.routing_weights(z, cfg.n_splits, cfg.n_skills) for z in logits]

    def key_members(self, owner: str, recipe: Recipe, seen: tuple[str, ...] = ()) -> tuple:
        """((member key, weight), ...): a mix's key changes whenever a member's does."""
        members = []
        for task, weight in recipe:
            info = self._member(owner, task, seen)
            nested = self.key_members(task, info.recipe, (*seen, owner)) if info.recipe is not None else ()
            members.append((AdapterKey(self.inventory.fingerprint, task, info.version, info.created, nested), weight))
        return tuple(members)

    def _mixed(self, owner: str, recipe: Recipe, seen: tuple[str, ...]) -> list[torch.Tensor]:
        total: list[torch.Tensor] | None = None
        for task, weight in recipe:
            self._member(owner, task, seen)
            member = self.weights(task, (*seen, owner))
            total = [weight * w for w in member] if total is None else [
                t + weight * w for t, w in zip(total, member, strict=True)]
        return total

    def _member(self, owner: str, task: str, seen: tuple[str, ...]) -> TaskInfo:
        asked = seen[0] if seen else owner  # the task or mix a request named
        if task == owner or task in seen:
            raise BrokenCompositionError(f"{owner!r} contains itself (through {task!r})", asked)
        try:
            return self.registry.task(task)
        except UnknownTaskError:
            raise BrokenCompositionError(f"{owner!r} uses task {task!r}, which no longer exists; {AGAIN}",
                                         asked) from None
        except BrokenTaskError as exc:
            raise BrokenCompositionError(f"{owner!r} uses task {task!r}, whose file is broken ({exc.file}: "
                                         f"{exc.reason}); {AGAIN}", asked) from None
