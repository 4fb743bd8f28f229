"""The adapter store: one inventory, its task registry, adapted tasks on disk, routing and export.

    store = AdapterStore.open("inventory/")
    store.adapter("my-task")            # TaskAdapter (float32, CPU), computed from the routing
    store.cache_key("my-task")          # (fingerprint, name, version, created) for an AdapterCache
    store.save_routing("new", "mhr-z", logits)   # persisted atomically, servable at once
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import persistence, routing
from .adapter import TaskAdapter
from .errors import InventoryError, TaskConflictError, UnknownTaskError
from .export import export_peft_lora
from .inventory import Inventory
from .lru import BytesLRU
from .names import MU_TASK, validate_task_name
from .registry import MU_INFO, AdapterKey, TaskInfo, read_pretrained_tasks

log = logging.getLogger(__name__)
LOGITS_CACHE_BYTES = 64 * 2**20


class AdapterStore:
    def __init__(self, inventory: Inventory, adapted_dir: Path | None = None):
        self.inventory = inventory
        self.adapted_dir = adapted_dir or inventory.folder / persistence.ADAPTED_DIR
        self._lock = threading.RLock()
        self._tasks: dict[str, TaskInfo] = read_pretrained_tasks(inventory.folder, inventory.config.n_tasks)
        self._adapted_meta: dict[str, dict[str, str]] = {}
        # adapted tasks' logits (~100x smaller than their adapters): a miss of the adapter cache routes
        # from memory instead of re-reading the task's file
        self._logits: BytesLRU[list[torch.Tensor]] = BytesLRU(LOGITS_CACHE_BYTES)  # guarded by _lock
        self._load_adapted()

    @classmethod
    def open(cls, folder: str | Path, adapted_dir: str | Path | None = None) -> AdapterStore:
        return cls(Inventory.read(folder), Path(adapted_dir) if adapted_dir else None)

    # ---- registry -------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.inventory.fingerprint

    def tasks(self) -> list[TaskInfo]:
        with self._lock:
            return [MU_INFO, *self._tasks.values()]

    def task(self, name: str) -> TaskInfo:
        if name == MU_TASK:
            return MU_INFO
        with self._lock:
            if name not in self._tasks:
                raise UnknownTaskError(name)
            return self._tasks[name]

    def cache_key(self, name: str) -> AdapterKey:
        """Names one adapter's content: a task deleted and adapted again gets a new key (its `created`)."""
        info = self.task(name)
        return AdapterKey(self.fingerprint, name, info.version, info.created)

    # ---- adapters ---------------------------------------------------------------------------
    def adapter(self, name: str) -> TaskAdapter:
        """The task's per-layer LoRA (float32, CPU): routed, μ, or as stored."""
        return self.adapters([name])[0]

    def adapters(self, names: Sequence[str]) -> list[TaskAdapter]:
        """Several tasks' adapters. Routed tasks (pretrained rows, z-method tasks) are mixed together,
        reading the inventory's skills once for all of them."""
        found: dict[str, TaskAdapter] = {}
        routed: dict[str, list[torch.Tensor]] = {}
        for name in dict.fromkeys(names):
            logits = self._routing_logits(name)
            if logits is None:
                found[name] = self._unrouted_adapter(name)
            else:
                routed[name] = logits
        if routed:
            per_group = [torch.stack(z) for z in zip(*routed.values(), strict=True)]  # [(U, L, H*K), ...]
            found.update(zip(routed, routing.routed_adapters(self.inventory, per_group), strict=True))
        return [found[name] for name in names]

    def adapter_for_logits(self, logits: list[torch.Tensor]) -> TaskAdapter:
        """Routed adapter for logits given per module group, [(L, H*K), ...] (used while adapting)."""
        return routing.routed_adapter(self.inventory, logits)

    def _routing_logits(self, name: str) -> list[torch.Tensor] | None:
        """A routed task's logits per module group [(L, H*K), ...]; None for μ and stored-LoRA tasks."""
        info = self.task(name)
        if info.kind == "pretrained":
            return routing.pretrained_logits(self.inventory, info.row)
        if info.kind == "adapted" and self._adapted_meta[name]["format"] == "routing":
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

    def _unrouted_adapter(self, name: str) -> TaskAdapter:
        if self.task(name).kind == "mu":
            return routing.mu_adapter(self.inventory)
        path = persistence.task_path(self.adapted_dir, name)
        return persistence.decode_lora(path, persistence.read_tensors(path), self.inventory.module_shapes,
                                       int(self._adapted_meta[name]["rank"]))

    # ---- persistence ---------------------------------------------------------------------------
    def check_writable(self, name: str, *, overwrite: bool = False) -> None:
        """May a task of this name be written? TaskNameError: not a valid name, or reserved (__mu__);
        TaskConflictError: a pretrained task, or an adapted one and `overwrite` is off."""
        validate_task_name(name)
        with self._lock:
            info = self._tasks.get(name)
        if info is None:
            return
        if info.kind != "adapted":
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

    def _save(self, name: str, method: str, fmt: str, tensors: dict, rank: int, overwrite: bool) -> TaskInfo:
        with self._lock:
            self.check_writable(name, overwrite=overwrite)
            previous = self._tasks.get(name)
            version = previous.version + 1 if previous else 1
            info = TaskInfo(name, "adapted", version, method, created=time.time())
            persistence.write_adapted(self.adapted_dir, info, fmt, tensors, self.fingerprint, rank)
            self._tasks[name] = info
            self._adapted_meta[name] = {"format": fmt, "rank": str(rank)}
            return info

    def delete(self, name: str) -> TaskInfo:
        with self._lock:
            info = self.task(name)
            if info.kind != "adapted":
                raise TaskConflictError(f"task {name!r} is {info.kind} and cannot be deleted")
            persistence.task_path(self.adapted_dir, name).unlink(missing_ok=True)
            del self._tasks[name], self._adapted_meta[name]
            return info

    def _load_adapted(self) -> None:
        removed = persistence.remove_partial_files(self.adapted_dir)
        if removed:
            log.warning("removed %d partial file(s) left in %s", len(removed), self.adapted_dir)
        for name, (info, meta) in persistence.read_adapted_headers(self.adapted_dir).items():
            if name in self._tasks:
                raise InventoryError(persistence.task_path(self.adapted_dir, name),
                                     "an adapted task has the name of a pretrained task", key=name)
            if meta["format"] == "routing" and meta["fingerprint"] != self.fingerprint:
                log.warning("skipping adapted task %r: its routing was learnt for inventory %s, not %s",
                            name, meta["fingerprint"], self.fingerprint)
                continue
            self._tasks[name] = info
            self._adapted_meta[name] = meta

    # ---- export ----------------------------------------------------------------------------
    def export_lora(self, name: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        cfg = self.inventory.config
        return export_peft_lora(self.adapter(name), out_dir, task_type=cfg.task_type,
                                base_model=cfg.base_model_name_or_path, overwrite=overwrite)

