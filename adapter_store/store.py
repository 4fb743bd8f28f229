"""The adapter store: one inventory, its task registry (task_registry.py), adapted tasks on disk, routing and export.

    store = AdapterStore.open("inventory/")
    store.adapter("my-task")            # TaskAdapter (float32, CPU), computed from the routing
    store.adapter(Mix.of({"a": .7, "b": .3}))   # a mix in skill space (mix.py, skill_space.py)
    store.cache_key("my-task")          # AdapterKey for an AdapterCache
    store.save_routing("new", "mhr-z", logits)   # persisted atomically, servable at once
    store.save_composition("ab", Mix.of({"a": .7, "b": .3}))   # a named mix

Shared by several processes (replicas): `AdapterStore.open(inv, adapted_dir, refresh_s=0.25)`; the registry looks
at the folder again (see task_registry.py). A file found unreadable when its tensors are read makes its task broken
(BrokenTaskError, 409); one deleted by another process meanwhile makes it unknown (404).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import arrow_spec, persistence, routing
from .adapter import TaskAdapter
from .errors import InventoryError, TaskConflictError, UnknownTaskError
from .export import export_peft_lora
from .inventory import Inventory
from .lru import BytesLRU
from .mix import MAX_MIX_TASKS, Mix, MixError, TaskRef
from .names import BASE_TASK, validate_task_name
from .registry import AdapterKey, TaskInfo
from .skill_space import SkillSpace
from .task_registry import BrokenTask, TaskRegistry

LOGITS_CACHE_BYTES = 64 * 2**20


class AdapterStore:
    def __init__(self, inventory: Inventory, adapted_dir: Path | None = None, *, refresh_s: float | None = None):
        """refresh_s: None (this process is the folder's only writer: read it once), or the age after which a
        lookup looks at the folder again (a folder shared with other processes)."""
        self.inventory = inventory
        self.adapted_dir = adapted_dir or inventory.folder / persistence.ADAPTED_DIR
        self.registry = TaskRegistry(inventory, self.adapted_dir, refresh_s=refresh_s)
        self.skills = SkillSpace(self.registry, self.routing_logits, self.is_routed)
        # adapted tasks' logits (~100x smaller than their adapters): a miss of the adapter cache routes
        # from memory instead of re-reading the task's file
        self._logits: BytesLRU[list[torch.Tensor]] = BytesLRU(LOGITS_CACHE_BYTES)  # guarded by _logits_lock
        self._logits_lock = threading.Lock()
        self._skills_on: dict[torch.device, Inventory] = {}  # keep_skills_on: routing on other devices

    def keep_skills_on(self, device: torch.device | str) -> None:
        """Keep a copy of the inventory's skills on `device` (inventory.skills_nbytes): adapters(..., device)
        route there."""
        device = torch.device(device)
        if device not in self._skills_on:
            self._skills_on[device] = self.inventory.skills_on(device)

    @classmethod
    def open(cls, folder: str | Path, adapted_dir: str | Path | None = None, *,
             refresh_s: float | None = None) -> AdapterStore:
        return cls(Inventory.read(folder), Path(adapted_dir) if adapted_dir else None, refresh_s=refresh_s)

    # ---- registry -------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.inventory.fingerprint

    def tasks(self) -> list[TaskInfo]:
        """Every servable task, μ first."""
        return self.registry.tasks()

    def broken_tasks(self) -> list[BrokenTask]:
        """Files in the adapted folder that cannot be served: (name, file, reason)."""
        return self.registry.broken()

    def task(self, name: str) -> TaskInfo:
        """UnknownTaskError (404) or BrokenTaskError (409, naming the file)."""
        return self.registry.task(name)

    def listing(self) -> list[TaskInfo]:
        """Every task, the broken ones last (kind "broken", with their reason)."""
        return [*self.tasks(), *(broken.info() for broken in self.broken_tasks())]

    def describe(self, name: str) -> TaskInfo:
        """The task's TaskInfo, a broken one's too; UnknownTaskError."""
        return self.registry.describe(name)

    def check_writable(self, name: str, *, overwrite: bool = False) -> None:
        """May a task of this name be written? TaskNameError: not a valid name, or reserved (__mu__);
        TaskConflictError: a pretrained task, or an existing one and `overwrite` is off."""
        self.registry.check_writable(name, overwrite=overwrite)

    def on_change(self, callback: Callable[[str], None]) -> None:
        """Call callback(name) for each task another process wrote, overwrote or deleted, when seen."""
        self.registry.on_change(callback)

    def refresh(self) -> list[str]:
        """Look at a shared adapted folder again now; the names that changed."""
        return self.registry.refresh()

    def cache_key(self, ref: TaskRef) -> AdapterKey:
        """Names one adapter's content: a task deleted and adapted again gets a new key (its `created`); a mix's
        or composed task's key holds its members' keys."""
        if isinstance(ref, Mix):
            return AdapterKey(self.fingerprint, ref.name, 0, None, self.skills.key_members(ref.name, ref.members))
        info = self.task(ref)
        members = self.skills.key_members(ref, info.recipe) if info.recipe is not None else ()
        return AdapterKey(self.fingerprint, ref, info.version, info.created, members)

    def check_mix(self, weights: dict[str, float], max_tasks: int = MAX_MIX_TASKS) -> Mix:
        """A servable mix, or MixError naming the field: weights ≥ 0 and not all zero, known tasks with skill
        weights (not plain-LoRA ones), at most max_tasks entries."""
        mix = Mix.of(weights, max_tasks)
        for task, _ in mix.members:
            try:
                self.task(task)
            except UnknownTaskError:
                raise MixError(f"unknown task {task!r}; GET /tasks lists the tasks", f"mix.{task}") from None
        self.skills.check(mix)
        return mix

    def skill_weights(self, ref: TaskRef) -> list[torch.Tensor]:
        """A task's or mix's normalised skill weights per module group [(L, H, K), ...] (skill_space.py)."""
        return self.skills.weights(ref)

    # ---- adapters ---------------------------------------------------------------------------
    def adapter(self, ref: TaskRef) -> TaskAdapter:
        """The task's (or mix's) per-layer LoRA (float32, CPU): routed, μ, mixed, or as stored."""
        return self.adapters([ref])[0]

    def adapters(self, refs: Sequence[TaskRef], device: torch.device | str | None = None) -> list[TaskAdapter]:
        """Several tasks' adapters. Everything in skill space (pretrained rows, z-method tasks, μ, mixes, composed
        tasks) is routed together, reading the inventory's skills once for all of them — on `device` where
        keep_skills_on(device) put a copy of them (the adapters routed there are on it), else on the host."""
        inventory = self._skills_on.get(torch.device(device), self.inventory) if device is not None else self.inventory
        found: dict[TaskRef, TaskAdapter] = {}
        weighted: dict[TaskRef, list[torch.Tensor]] = {}
        for ref in dict.fromkeys(refs):
            if ref == BASE_TASK:
                found[ref] = self._zero_adapter()
            elif self._is_plain_lora(ref):
                found[ref] = self._stored_lora(ref)
            else:
                weighted[ref] = self.skills.weights(ref)
        if weighted:
            skills_device = inventory.groups[0].lora_a.device
            per_group = [torch.stack(w).to(skills_device)  # [(U, L, H, K), ...]
                         for w in zip(*weighted.values(), strict=True)]
            found.update(zip(weighted, routing.adapters_from_weights(inventory, per_group), strict=True))
        return [found[ref] for ref in refs]

    def _zero_adapter(self) -> TaskAdapter:
        """The bare backbone's adapter: A and B of zeros for every module (y = base(x) exactly)."""
        r = self.inventory.config.r
        return TaskAdapter.from_layers({name: (torch.zeros(d_in, r), torch.zeros(r, d_out))
                                        for name, (d_in, d_out) in self.inventory.module_shapes.items()}, r)

    def adapter_for_logits(self, logits: list[torch.Tensor]) -> TaskAdapter:
        """Routed adapter for logits given per module group, [(L, H*K), ...] (used while adapting)."""
        return routing.routed_adapter(self.inventory, logits)

    def is_routed(self, name: str) -> bool:
        """Whether the task has routing logits (pretrained, or adapted as routing), its file unread."""
        info = self.task(name)
        return info.kind == "pretrained" or self._adapted_routing(info)

    def _adapted_routing(self, info: TaskInfo) -> bool:
        return info.kind == "adapted" and self.registry.meta(info.name)["format"] == "routing"

    def routing_logits(self, name: str) -> list[torch.Tensor] | None:
        """A routed task's logits per module group [(L, H*K), ...]; None for the others."""
        info = self.task(name)
        if info.kind == "pretrained":
            return routing.pretrained_logits(self.inventory, info.row)
        if self._adapted_routing(info):
            key = (name, info.version, info.created)
            with self._logits_lock:
                logits = self._logits.get(key)
            if logits is None:
                cfg = self.inventory.config
                logits = self._decoded(name, lambda path, tensors: persistence.decode_routing(
                    path, tensors, self.inventory.groups, cfg.n_splits * cfg.n_skills))
                with self._logits_lock:
                    self._logits.put(key, logits, sum(z.numel() * z.element_size() for z in logits))
            return logits
        return None

    def _is_plain_lora(self, ref: TaskRef) -> bool:
        return isinstance(ref, str) and self.task(ref).kind == "adapted" and self.registry.meta(ref)["format"] == "lora"

    def _stored_lora(self, name: str) -> TaskAdapter:
        rank = int(self.registry.meta(name)["rank"])
        return self._decoded(name, lambda path, tensors: persistence.decode_lora(
            path, tensors, self.inventory.module_shapes, rank))

    def _decoded(self, name: str, decode: Callable[[Path, dict], object]):
        """decode(path, tensors) of the task's file. Gone (deleted by another process since the last look):
        UnknownTaskError; unreadable (changed in place since it was checked): the task is broken from now on."""
        path = persistence.task_path(self.adapted_dir, name)
        try:
            return decode(path, persistence.read_tensors(path))
        except FileNotFoundError:
            self.registry.look_at(name)
            raise UnknownTaskError(name) from None
        except InventoryError as exc:
            raise self.registry.mark_broken(name, exc) from exc

    # ---- persistence ---------------------------------------------------------------------------
    def save_routing(self, name: str, method: str, logits: list[torch.Tensor], *,
                     overwrite: bool = True) -> TaskInfo:
        """Persist a z-method task: logits per module group [(L, H*K), ...]."""
        tensors = persistence.encode_routing(self.inventory.groups, logits)
        return self._save(name, method, "routing", tensors, self.inventory.config.r, overwrite)

    def save_lora(self, name: str, method: str, adapter: TaskAdapter, *, overwrite: bool = True) -> TaskInfo:
        """Persist a plain-LoRA task (MHR-μ): A (d_in, r) and B (r, d_out) per module."""
        return self._save(name, method, "lora", persistence.encode_lora(adapter), adapter.rank, overwrite)

    def save_composition(self, name: str, mix: Mix, *, overwrite: bool = False,
                         method: str = "composition") -> TaskInfo:
        """Persist a named mix (its recipe: member names and weights, resolved whenever it is served)."""
        validate_task_name(name)  # before anything touches the folder
        with self.registry.writing():
            self.check_writable(name, overwrite=overwrite)
            self.skills.key_members(name, mix.members)  # no member is the task itself (or contains it)
            info = TaskInfo(name, "composed", self.registry.next_version(name), method, created=time.time(),
                            recipe=mix.members)
            persistence.write_composition(self.adapted_dir, info, self.fingerprint, self.inventory.config.r)
            return self.registry.register(info, "composition", self.inventory.config.r)

    def save_route(self, name: str, spec: arrow_spec.ArrowSpec, *, overwrite: bool = False) -> TaskInfo:
        """Persist a named Arrow route (kind "composed", method "arrow"): served by routing each token (arrow.py)."""
        validate_task_name(name)
        with self.registry.writing():
            self.check_writable(name, overwrite=overwrite)
            info = TaskInfo(name, "composed", self.registry.next_version(name), "arrow", created=time.time(),
                            route=arrow_spec.route_of(spec))
            persistence.write_adapted(self.adapted_dir, info, "arrow", {}, self.fingerprint, self.inventory.config.r,
                                      route=arrow_spec.route_header(spec))
            return self.registry.register(info, "arrow", self.inventory.config.r)

    def _save(self, name: str, method: str, fmt: str, tensors: dict, rank: int, overwrite: bool) -> TaskInfo:
        validate_task_name(name)
        with self.registry.writing():
            self.check_writable(name, overwrite=overwrite)
            info = TaskInfo(name, "adapted", self.registry.next_version(name), method, created=time.time())
            persistence.write_adapted(self.adapted_dir, info, fmt, tensors, self.fingerprint, rank)
            return self.registry.register(info, fmt, rank)

    def delete(self, name: str) -> TaskInfo:
        """Delete an adapted, composed or broken task. Compositions that use it fail from then on (409), until
        composed again without it."""
        return self.registry.delete(name)

    # ---- export ----------------------------------------------------------------------------
    def export_lora(self, name: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        if name == BASE_TASK:
            raise TaskConflictError(f"task {BASE_TASK!r} is the backbone with no adapter: there is nothing to export")
        cfg = self.inventory.config
        return export_peft_lora(self.adapter(name), out_dir, task_type=cfg.task_type,
                                base_model=cfg.base_model_name_or_path, overwrite=overwrite)
