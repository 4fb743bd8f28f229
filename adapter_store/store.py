"""The adapter store: one inventory, its task registry, adapted tasks on disk, routing and export.

    store = AdapterStore.open("inventory/")
    store.adapter("my-task")            # TaskAdapter (float32, CPU), computed from the routing
    store.adapter(Mix.of({"a": .7, "b": .3}))   # a mix in skill space (mix.py)
    store.cache_key("my-task")          # AdapterKey for an AdapterCache
    store.save_routing("new", "mhr-z", logits)   # persisted atomically, servable at once
    store.save_composition("ab", Mix.of({"a": .7, "b": .3}))   # a named mix

Shared by several processes (replicas): `AdapterStore.open(inv, adapted_dir, refresh_s=0.25)` re-reads the
adapted folder at a lookup whenever its last look is older than refresh_s — only the headers of files whose
signature changed — so a task written, overwritten or deleted by another process is served in its new version (or
unknown) here within refresh_s. Writers take the folder's lock and look again first, so versions keep counting up.
`on_change(callback)` is told each name that changed that way (e.g. to drop its cached adapters).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from . import arrow, persistence, routing, skill_space
from .adapter import TaskAdapter
from .errors import InventoryError, TaskConflictError, UnknownTaskError
from .export import export_peft_lora
from .inventory import Inventory
from .lru import BytesLRU
from .mix import MAX_MIX_TASKS, Mix, MixError, TaskRef
from .names import MU_TASK, validate_task_name
from .registry import MU_INFO, AdapterKey, TaskInfo, read_pretrained_tasks

log = logging.getLogger(__name__)
LOGITS_CACHE_BYTES = 64 * 2**20
WRITABLE = ("adapted", "composed")  # kinds a client may overwrite or delete
PARTIAL_FILE_AGE_S = 600.0  # a shared folder: temp files older than this are a dead writer's leftovers


class AdapterStore:
    def __init__(self, inventory: Inventory, adapted_dir: Path | None = None, *, refresh_s: float | None = None):
        """refresh_s: None (this process is the folder's only writer: read it once), or the age after which a
        lookup looks at the folder again (a folder shared with other processes)."""
        self.inventory = inventory
        self.adapted_dir = adapted_dir or inventory.folder / persistence.ADAPTED_DIR
        self.refresh_s = refresh_s
        self._lock = threading.RLock()
        self._pretrained = read_pretrained_tasks(inventory.folder, inventory.config.n_tasks)
        self._tasks: dict[str, TaskInfo] = dict(self._pretrained)
        self._adapted_meta: dict[str, dict[str, str]] = {}
        # adapted tasks' logits (~100x smaller than their adapters): a miss of the adapter cache routes
        # from memory instead of re-reading the task's file
        self._logits: BytesLRU[list[torch.Tensor]] = BytesLRU(LOGITS_CACHE_BYTES)  # guarded by _lock
        self._seen: dict[str, persistence.Signature] = {}  # the adapted files as last looked at
        self._looked_at = time.monotonic()
        self._listeners: list[Callable[[str], None]] = []
        self._load_adapted()

    @classmethod
    def open(cls, folder: str | Path, adapted_dir: str | Path | None = None, *,
             refresh_s: float | None = None) -> AdapterStore:
        return cls(Inventory.read(folder), Path(adapted_dir) if adapted_dir else None, refresh_s=refresh_s)

    # ---- registry -------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.inventory.fingerprint

    def tasks(self) -> list[TaskInfo]:
        self._fresh()
        with self._lock:
            return [MU_INFO, *self._tasks.values()]

    def task(self, name: str) -> TaskInfo:
        if name == MU_TASK:
            return MU_INFO
        self._fresh()
        with self._lock:
            if name not in self._tasks:
                raise UnknownTaskError(name)
            return self._tasks[name]

    def cache_key(self, ref: TaskRef) -> AdapterKey:
        """Names one adapter's content: a task deleted and adapted again gets a new key (its `created`); a mix's
        or composed task's key holds its members' keys."""
        if isinstance(ref, Mix):
            return AdapterKey(self.fingerprint, ref.name, 0, None, skill_space.key_members(self, ref.name, ref.members))
        info = self.task(ref)
        members = skill_space.key_members(self, ref, info.recipe) if info.recipe is not None else ()
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
        skill_space.weights(self, mix)
        return mix

    # ---- adapters ---------------------------------------------------------------------------
    def adapter(self, ref: TaskRef) -> TaskAdapter:
        """The task's (or mix's) per-layer LoRA (float32, CPU): routed, μ, mixed, or as stored."""
        return self.adapters([ref])[0]

    def adapters(self, refs: Sequence[TaskRef]) -> list[TaskAdapter]:
        """Several tasks' adapters. Everything in skill space (pretrained rows, z-method tasks, μ, mixes, composed
        tasks) is routed together, reading the inventory's skills once for all of them."""
        found: dict[TaskRef, TaskAdapter] = {}
        weighted: dict[TaskRef, list[torch.Tensor]] = {}
        for ref in dict.fromkeys(refs):
            if self._is_plain_lora(ref):
                found[ref] = self._stored_lora(ref)
            else:
                weighted[ref] = skill_space.weights(self, ref)
        if weighted:
            per_group = [torch.stack(w) for w in zip(*weighted.values(), strict=True)]  # [(U, L, H, K), ...]
            found.update(zip(weighted, routing.adapters_from_weights(self.inventory, per_group), strict=True))
        return [found[ref] for ref in refs]

    def adapter_for_logits(self, logits: list[torch.Tensor]) -> TaskAdapter:
        """Routed adapter for logits given per module group, [(L, H*K), ...] (used while adapting)."""
        return routing.routed_adapter(self.inventory, logits)

    def routing_logits(self, name: str) -> list[torch.Tensor] | None:
        """A routed task's logits per module group [(L, H*K), ...]; None for the others."""
        info = self.task(name)
        if info.kind == "pretrained":
            return routing.pretrained_logits(self.inventory, info.row)
        if info.kind == "adapted" and self._meta(name)["format"] == "routing":
            key = (name, info.version, info.created)
            with self._lock:
                logits = self._logits.get(key)
            if logits is None:
                path = persistence.task_path(self.adapted_dir, name)
                cfg = self.inventory.config
                logits = persistence.decode_routing(path, persistence.read_tensors(path), self.inventory.groups,
                                                    cfg.n_splits * cfg.n_skills)
                with self._lock:
                    self._logits.put(key, logits, sum(z.numel() * z.element_size() for z in logits))
            return logits
        return None

    def _is_plain_lora(self, ref: TaskRef) -> bool:
        return isinstance(ref, str) and self.task(ref).kind == "adapted" and self._meta(ref)["format"] == "lora"

    def _stored_lora(self, name: str) -> TaskAdapter:
        path = persistence.task_path(self.adapted_dir, name)
        return persistence.decode_lora(path, persistence.read_tensors(path), self.inventory.module_shapes,
                                       int(self._meta(name)["rank"]))

    def _meta(self, name: str) -> dict[str, str]:
        """An adapted task's header metadata (UnknownTaskError if another process deleted it meanwhile)."""
        with self._lock:
            meta = self._adapted_meta.get(name)
        if meta is None:
            raise UnknownTaskError(name)
        return meta

    # ---- persistence ---------------------------------------------------------------------------
    def check_writable(self, name: str, *, overwrite: bool = False) -> None:
        """May a task of this name be written? TaskNameError: not a valid name, or reserved (__mu__);
        TaskConflictError: a pretrained task, or an adapted or composed one and `overwrite` is off."""
        validate_task_name(name)
        self._fresh()
        with self._lock:
            info = self._tasks.get(name)
        if info is None:
            return
        if info.kind not in WRITABLE:
            raise TaskConflictError(f"task {name!r} is a pretrained task and cannot be replaced")
        if not overwrite:
            raise TaskConflictError(f"task {name!r} already exists; set overwrite=true to replace it (version goes up)")

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
        with self._writing():
            self.check_writable(name, overwrite=overwrite)
            skill_space.key_members(self, name, mix.members)  # no member is the task itself (or contains it)
            info = TaskInfo(name, "composed", self._next_version(name), method, created=time.time(),
                            recipe=mix.members)
            persistence.write_composition(self.adapted_dir, info, self.fingerprint, self.inventory.config.r)
            return self._register(info, "composition", self.inventory.config.r)

    def save_route(self, name: str, spec: arrow.ArrowSpec, *, overwrite: bool = False) -> TaskInfo:
        """Persist a named Arrow route (kind "composed", method "arrow"): served by routing each token (arrow.py)."""
        validate_task_name(name)
        with self._writing():
            self.check_writable(name, overwrite=overwrite)
            info = TaskInfo(name, "composed", self._next_version(name), "arrow", created=time.time(),
                            route=arrow.route_of(spec))
            persistence.write_adapted(self.adapted_dir, info, "arrow", {}, self.fingerprint, self.inventory.config.r,
                                      route=arrow.route_header(spec))
            return self._register(info, "arrow", self.inventory.config.r)

    def _save(self, name: str, method: str, fmt: str, tensors: dict, rank: int, overwrite: bool) -> TaskInfo:
        validate_task_name(name)
        with self._writing():
            self.check_writable(name, overwrite=overwrite)
            info = TaskInfo(name, "adapted", self._next_version(name), method, created=time.time())
            persistence.write_adapted(self.adapted_dir, info, fmt, tensors, self.fingerprint, rank)
            return self._register(info, fmt, rank)

    def _next_version(self, name: str) -> int:
        previous = self._tasks.get(name)
        return previous.version + 1 if previous else 1

    def _register(self, info: TaskInfo, fmt: str, rank: int) -> TaskInfo:
        self._tasks[info.name] = info
        self._adapted_meta[info.name] = {"format": fmt, "rank": str(rank)}
        self._seen[info.name] = persistence.signature(persistence.task_path(self.adapted_dir, info.name))
        return info

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the store's lock (and, shared, the folder's lock, after looking at the folder again)."""
        with self._lock:
            shared = self.refresh_s is not None
            with persistence.folder_lock(self.adapted_dir) if shared else nullcontext():
                if shared:
                    self._notify(self.refresh())
                yield

    def delete(self, name: str) -> TaskInfo:
        """Delete an adapted or composed task. Compositions that use it fail from then on (409), until composed
        again without it."""
        with self._writing():
            info = self.task(name)
            if info.kind not in WRITABLE:
                raise TaskConflictError(f"task {name!r} is {info.kind} and cannot be deleted")
            persistence.task_path(self.adapted_dir, name).unlink(missing_ok=True)
            del self._tasks[name], self._adapted_meta[name]
            self._seen.pop(name, None)
            return info

    def _load_adapted(self) -> None:
        age = PARTIAL_FILE_AGE_S if self.refresh_s is not None else 0.0  # shared: others may be writing now
        removed = persistence.remove_partial_files(self.adapted_dir, older_than_s=age)
        if removed:
            log.warning("removed %d partial file(s) left in %s", len(removed), self.adapted_dir)
        self._seen = persistence.signatures(self.adapted_dir)
        for name, (info, meta) in persistence.read_adapted_headers(self.adapted_dir).items():
            if name in self._tasks:
                raise InventoryError(persistence.task_path(self.adapted_dir, name),
                                     "an adapted task has the name of a pretrained task", key=name)
            self._admit(info, meta)

    def _admit(self, info: TaskInfo, meta: dict[str, str]) -> None:
        if meta["format"] in ("routing", "composition", "arrow") and meta["fingerprint"] != self.fingerprint:
            log.warning("skipping adapted task %r: its routing was learnt for inventory %s, not %s",
                        info.name, meta["fingerprint"], self.fingerprint)
            return
        self._tasks[info.name] = info
        self._adapted_meta[info.name] = meta

    # ---- a folder shared with other processes -----------------------------------------------------
    def on_change(self, callback: Callable[[str], None]) -> None:
        """Call callback(name) for each task another process wrote, overwrote or deleted, when seen."""
        self._listeners.append(callback)

    def refresh(self) -> list[str]:
        """Look at the adapted folder again: read the headers of new or rewritten files, forget deleted ones.
        Returns the names that changed. Cheap when nothing did: one directory listing and a stat per file."""
        with self._lock:
            self._looked_at = time.monotonic()
            now = persistence.signatures(self.adapted_dir)
            changed = [name for name, sig in now.items() if self._seen.get(name) != sig]
            gone = [name for name in self._seen if name not in now]
            for name in gone:
                self._forget(name)
            for name in changed:
                path = persistence.task_path(self.adapted_dir, name)
                try:
                    info, meta = persistence.read_adapted_header(path)
                except FileNotFoundError:  # deleted since the listing: the next look says so
                    now.pop(name)
                    self._forget(name)
                    continue
                except InventoryError as exc:
                    log.warning("ignoring adapted task %r until its file is readable: %s", name, exc)
                    self._forget(name)
                    continue
                self._forget(name)
                if name in self._pretrained:
                    log.warning("ignoring %s: an adapted task has the name of a pretrained task", path)
                    continue
                self._admit(info, meta)
            self._seen = now
            return [*gone, *changed]

    def _forget(self, name: str) -> None:
        if name not in self._pretrained:
            self._tasks.pop(name, None)
            self._adapted_meta.pop(name, None)

    def _fresh(self) -> None:
        """Shared folder: look again if the last look is older than refresh_s."""
        if self.refresh_s is None or time.monotonic() - self._looked_at < self.refresh_s:
            return
        with self._lock:
            if time.monotonic() - self._looked_at < self.refresh_s:
                return  # another thread looked meanwhile
            changed = self.refresh()
        self._notify(changed)

    def _notify(self, names: list[str]) -> None:
        for name in names:
            for callback in self._listeners:
                callback(name)

    # ---- export ----------------------------------------------------------------------------
    def export_lora(self, name: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        cfg = self.inventory.config
        return export_peft_lora(self.adapter(name), out_dir, task_type=cfg.task_type,
                                base_model=cfg.base_model_name_or_path, overwrite=overwrite)

