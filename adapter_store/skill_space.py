"""Tasks as points in skill space: each routed task's normalised skill weights per layer and head, and those
of mixes and composed tasks (weighted sums of their members', see mix.py), resolved from the registry as it is
now — so a member's new version reaches every mix that holds it, and a member gone breaks it (409).

    space = SkillSpace(registry, logits_of, is_routed)  # logits_of(name): a routed task's logits, None for a plain
                                                  # LoRA; is_routed(name): whether it has them, its file unread
    space.weights("reverse-upper")                # [(L, H, K), ...] per module group
    space.check(Mix.of({"a": .7, "b": .3}))       # what weights() would raise, no tensor computed
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
    def __init__(self, registry: TaskRegistry, logits_of: LogitsOf, is_routed: Callable[[str], bool]):
        self.registry = registry
        self.inventory = registry.inventory
        self.logits_of = logits_of
        self.is_routed = is_routed

    def weights(self, ref: TaskRef, seen: tuple[str, ...] = ()) -> list[torch.Tensor]:
        """Normalised skill weights per module group [(L, H, K), ...]. MixError for a task stored as a plain
        LoRA."""
        if isinstance(ref, Mix):
            return self._mixed(ref.name, ref.members, seen)
        info = self._with_weights(ref)
        cfg = self.inventory.config
        if info.kind == "mu":
            return [routing.uniform_weights(len(g.names), cfg.n_splits, cfg.n_skills) for g in self.inventory.groups]
        if info.recipe is not None:
            return self._mixed(ref, info.recipe, seen)
        return [routing.routing_weights(z, cfg.n_splits, cfg.n_skills) for z in self.logits_of(ref)]

    def check(self, ref: TaskRef, seen: tuple[str, ...] = ()) -> None:
        """What `weights` raises for this task or mix (MixError, BrokenCompositionError), with no tensor computed:
        requests are checked on the event loop's thread, where torch must not run (server/torch_threads.py)."""
        owner, recipe = (ref.name, ref.members) if isinstance(ref, Mix) else (ref, self._with_weights(ref).recipe)
        for task, _ in recipe or ():
            self._member(owner, task, seen)
            self.check(task, (*seen, owner))

    def _with_weights(self, ref: str) -> TaskInfo:
        """The task's registry entry; MixError where it has no skill weights (the backbone, an Arrow route, a plain
        LoRA)."""
        info = self.registry.task(ref)
        if info.kind == "mu" or info.recipe is not None:
            return info
        if info.kind == "base":
            raise MixError(f"task {ref!r} is the backbone with no adapter: it has no skill weights, so it cannot join "
                           "a skill-space mix", f"mix.{ref}")
        if info.route is not None:
            raise MixError(f"task {ref!r} is an Arrow route (each token routed over a library): it has no skill "
                           "weights, so it cannot join a skill-space mix", f"mix.{ref}")
        if not self.is_routed(ref):
            raise MixError(f"task {ref!r} is stored as a plain LoRA ({info.method}): it has no skill weights, so it "
                           "cannot join a skill-space mix", f"mix.{ref}")
        return info

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
