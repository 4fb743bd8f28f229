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
from .registry import MU_INFO, TaskInfo, read_pretrained_tasks

log = logging.getLogger(__name__)
LOGITS_SUFFIX = ".module_logits"
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

    def cache_key(self, name: str) -> tuple[str, str, int, float | None]:
        """Names one adapter's content: a task deleted and adapted again gets a new key (its `created`)."""
        info = self.task(name)
        return (self.fingerprint, name, info.version, info.created)

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
                logits = self._logits_from_tensors(path, persistence.read_tensors(path))
                with self._lock:
                    self._logits.put(key, logits, sum(z.numel() * z.element_size() for z in logits))
            return logits
        return None

    def _unrouted_adapter(self, name: str) -> TaskAdapter:
        if self.task(name).kind == "mu":
            return routing.mu_adapter(self.inventory)
        path = persistence.task_path(self.adapted_dir, name)
        return self._lora_from_tensors(path, persistence.read_tensors(path), int(self._adapted_meta[name]["rank"]))

    def _logits_from_tensors(self, path: Path, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        width = self.inventory.config.n_splits * self.inventory.config.n_skills
        out = []
        for group in self.inventory.groups:
            rows = [_tensor(path, tensors, name + LOGITS_SUFFIX, (width,)) for name in group.names]
            out.append(torch.stack(rows).float())  # (L, H*K)
        return out

    def _lora_from_tensors(self, path: Path, tensors: dict[str, torch.Tensor], rank: int) -> TaskAdapter:
        shapes = self.inventory.module_shapes
        layers = {
            name: (_tensor(path, tensors, name + ".lora_A", (d_in, rank)).float(),
                   _tensor(path, tensors, name + ".lora_B", (rank, d_out)).float())
            for name, (d_in, d_out) in shapes.items()
        }
        return TaskAdapter.from_layers(layers, rank)

    # ---- persistence ---------------------------------------------------------------------------
    def save_routing(self, name: str, method: str, logits: list[torch.Tensor]) -> TaskInfo:
        """Persist a z-method task: logits per module group [(L, H*K), ...]."""
        tensors = {
            module + LOGITS_SUFFIX: z[i].float()
            for group, z in zip(self.inventory.groups, logits, strict=True)
            for i, module in enumerate(group.names)
        }
        return self._save(name, method, "routing", tensors, self.inventory.config.r)

    def save_lora(self, name: str, method: str, adapter: TaskAdapter) -> TaskInfo:
        """Persist a plain-LoRA task (MHR-μ): A (d_in, r) and B (r, d_out) per module."""
        tensors = {}
        for module, a, b in adapter.layers():
            tensors[module + ".lora_A"], tensors[module + ".lora_B"] = a.float(), b.float()
        return self._save(name, method, "lora", tensors, adapter.rank)

    def _save(self, name: str, method: str, fmt: str, tensors: dict, rank: int) -> TaskInfo:
        validate_task_name(name)
        with self._lock:
            previous = self._tasks.get(name)
            if previous is not None and previous.kind != "adapted":
                raise TaskConflictError(f"task {name!r} is a pretrained task and cannot be overwritten")
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


def _tensor(path: Path, tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in tensors:
        raise InventoryError(path, "missing key", key=key)
    if tuple(tensors[key].shape) != shape:
        raise InventoryError(path, f"expected shape {shape}, found {tuple(tensors[key].shape)}", key=key)
    return tensors[key]
