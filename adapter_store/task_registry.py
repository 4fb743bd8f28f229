"""The task registry: every task's TaskInfo by name — the inventory's pretrained rows (tasks.json) and the adapted
and composed tasks of the adapted folder, with their header metadata and versions — and the broken tasks: files in
the adapted folder that cannot be served (name, file, reason).

An adapted file is checked when it is first seen, from its safetensors header alone (no tensor data is read):
metadata, recipe, and every tensor's key and shape against the inventory. One that fails is a broken task, not a
failed start-up: it is listed, its requests are refused naming the file (BrokenTaskError), and writing the file
again (or deleting it) brings it back (or removes it).

Shared by several processes (refresh_s not None): a lookup looks at the folder again when its last look is older
than refresh_s (only the headers of files whose signature changed are read), and a name the registry does not know
is looked up on disk at once — a miss is never answered from a stale view. Writers take the folder's lock and look
again first, so versions keep counting up. `on_change(callback)` is told each name another process changed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

from . import persistence
from .errors import BrokenTaskError, InventoryError, TaskConflictError, TaskNameError, UnknownTaskError
from .inventory import Inventory
from .names import BASE_TASK, MU_TASK, validate_task_name
from .registry import BASE_INFO, MU_INFO, TaskInfo, read_pretrained_tasks

log = logging.getLogger(__name__)
WRITABLE = ("adapted", "composed")  # kinds a client may overwrite or delete
PARTIAL_FILE_AGE_S = 600.0  # a shared folder: temp files older than this are a dead writer's leftovers


class BrokenTask(NamedTuple):
    """A file in the adapted folder that cannot be served, and why."""

    name: str
    file: str
    reason: str

    def error(self) -> BrokenTaskError:
        return BrokenTaskError(self.name, self.file, self.reason)

    def info(self) -> TaskInfo:
        return TaskInfo(self.name, "broken", 0, "unknown", reason=f"{self.file}: {self.reason}")


class TaskRegistry:
    def __init__(self, inventory: Inventory, adapted_dir: Path, *, refresh_s: float | None = None):
        """refresh_s: None (this process is the folder's only writer: read it once), or the age after which a
        lookup looks at the folder again (a folder shared with other processes)."""
        self.inventory = inventory
        self.adapted_dir = adapted_dir
        self.refresh_s = refresh_s
        self.lock = threading.RLock()
        self._pretrained = read_pretrained_tasks(inventory.folder, inventory.config.n_tasks)
        self._tasks: dict[str, TaskInfo] = dict(self._pretrained)
        self._meta: dict[str, dict[str, str]] = {}  # adapted and composed tasks' header metadata
        self._broken: dict[str, BrokenTask] = {}
        self._seen: dict[str, persistence.Signature] = {}  # the adapted files as last looked at
        self._looked_at = time.monotonic()
        self._listeners: list[Callable[[str], None]] = []
        self._load()

    @property
    def shared(self) -> bool:
        return self.refresh_s is not None

    # ---- lookups -----------------------------------------------------------------------------------
    def tasks(self) -> list[TaskInfo]:
        """Every servable task, μ and the bare backbone first (broken ones: `broken()`)."""
        self.fresh()
        with self.lock:
            return [MU_INFO, BASE_INFO, *self._tasks.values()]

    def broken(self) -> list[BrokenTask]:
        self.fresh()
        with self.lock:
            return sorted(self._broken.values())

    def describe(self, name: str) -> TaskInfo:
        """The task's TaskInfo, a broken one's too (kind "broken", with its reason); UnknownTaskError."""
        try:
            return self.task(name)
        except BrokenTaskError:
            with self.lock:
                broken = self._broken.get(name)
            if broken is None:  # fixed meanwhile
                return self.task(name)
            return broken.info()

    def task(self, name: str) -> TaskInfo:
        """UnknownTaskError: no such task (checked on disk first, shared); BrokenTaskError: its file is unusable."""
        if name == MU_TASK:
            return MU_INFO
        if name == BASE_TASK:
            return BASE_INFO
        self.fresh()
        found = self._known(name)
        if found is None and self.shared:
            self.look_at(name)
            found = self._known(name)
        if found is None:
            raise UnknownTaskError(name)
        return found

    def _known(self, name: str) -> TaskInfo | None:
        with self.lock:
            if name in self._broken:
                raise self._broken[name].error()
            return self._tasks.get(name)

    def _exists(self, name: str) -> bool:
        with self.lock:
            return name in self._tasks or name in self._broken

    def meta(self, name: str) -> dict[str, str]:
        """An adapted task's header metadata (UnknownTaskError if another process deleted it meanwhile)."""
        with self.lock:
            meta = self._meta.get(name)
        if meta is None:
            raise UnknownTaskError(name)
        return meta

    def check_writable(self, name: str, *, overwrite: bool = False) -> None:
        """May a task of this name be written? TaskNameError: not a valid name, or reserved (__mu__);
        TaskConflictError: a pretrained task, or an adapted, composed or broken one and `overwrite` is off."""
        validate_task_name(name)
        self.fresh()
        if self.shared and not self._exists(name):
            self.look_at(name)  # a miss is not answered from a stale view
        with self.lock:
            info = self._tasks.get(name)
            broken = name in self._broken
        if info is None and not broken:
            return
        if info is not None and info.kind not in WRITABLE:
            raise TaskConflictError(f"task {name!r} is a pretrained task and cannot be replaced")
        if not overwrite:
            raise TaskConflictError(f"task {name!r} already exists; set overwrite=true to replace it (version goes up)")

    # ---- writing -----------------------------------------------------------------------------------
    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the registry's lock (and, shared, the folder's lock, after looking at the folder again)."""
        with self.lock, persistence.folder_lock(self.adapted_dir) if self.shared else nullcontext():
            if self.shared:
                self._notify(self.refresh())
            yield

    def next_version(self, name: str) -> int:
        previous = self._tasks.get(name)
        return previous.version + 1 if previous else 1

    def register(self, info: TaskInfo, fmt: str, rank: int) -> TaskInfo:
        """A task just written by this process (inside `writing`)."""
        self._broken.pop(info.name, None)
        self._tasks[info.name] = info
        self._meta[info.name] = {"format": fmt, "rank": str(rank)}
        self._seen[info.name] = persistence.signature(persistence.task_path(self.adapted_dir, info.name))
        return info

    def delete(self, name: str) -> TaskInfo:
        """Remove an adapted, composed or broken task's file and entry; its TaskInfo as it was (a broken task's:
        kind "broken")."""
        with self.writing():
            broken = self._broken.get(name)
            info = broken.info() if broken is not None else self.task(name)
            if info.kind not in (*WRITABLE, "broken"):
                raise TaskConflictError(f"task {name!r} is {info.kind} and cannot be deleted")
            persistence.remove_task_file(self.adapted_dir, name)
            self._forget(name)
            self._seen.pop(name, None)
            return info

    def mark_broken(self, name: str, error: InventoryError) -> BrokenTaskError:
        """A file found unusable after it was admitted (e.g. rewritten in place): the task is broken from now on."""
        broken = BrokenTask(name, error.file, error.problem if error.key is None else f"{error.problem} "
                            f"[key {error.key!r}]")
        log.error("adapted task %r is broken: %s: %s", name, broken.file, broken.reason)
        with self.lock:
            self._forget(name)
            self._broken[name] = broken
        return broken.error()

    # ---- the folder --------------------------------------------------------------------------------
    def on_change(self, callback: Callable[[str], None]) -> None:
        """Call callback(name) for each task another process wrote, overwrote or deleted, when seen."""
        self._listeners.append(callback)

    def refresh(self) -> list[str]:
        """Look at the adapted folder again: read the headers of new or rewritten files, forget deleted ones.
        Returns the names that changed. Cheap when nothing did: one directory listing and a stat per file."""
        with self.lock:
            self._looked_at = time.monotonic()
            now = persistence.signatures(self.adapted_dir)
            changed = [name for name, sig in now.items() if self._seen.get(name) != sig]
            gone = [name for name in self._seen if name not in now]
            for name in gone:
                self._forget(name)
            for name in changed:
                self._read(name, now)
            self._seen = now
            return [*gone, *changed]

    def look_at(self, name: str) -> None:
        """Shared folder: look at one name's file now (one stat; its header if it changed)."""
        try:
            path = persistence.task_path(self.adapted_dir, name)
        except TaskNameError:
            return  # never a file
        with self.lock:
            now = {name: sig} if (sig := persistence.signature(path)) is not None else {}
            if self._seen.get(name) == now.get(name):
                return
            if name in now:
                self._read(name, now)
            else:
                self._forget(name)
            self._seen.pop(name, None)
            self._seen.update(now)
        self._notify([name])

    def fresh(self) -> None:
        """Shared folder: look again if the last look is older than refresh_s."""
        if self.refresh_s is None or time.monotonic() - self._looked_at < self.refresh_s:
            return
        with self.lock:
            if time.monotonic() - self._looked_at < self.refresh_s:
                return  # another thread looked meanwhile
            changed = self.refresh()
        self._notify(changed)

    def _load(self) -> None:
        age = PARTIAL_FILE_AGE_S if self.shared else 0.0  # shared: others may be writing now
        removed = persistence.remove_partial_files(self.adapted_dir, older_than_s=age)
        if removed:
            log.warning("removed %d partial file(s) left in %s", len(removed), self.adapted_dir)
        self.refresh()

    def _read(self, name: str, now: dict[str, persistence.Signature]) -> None:
        """Admit the task in `name`'s file, or record it broken; a file gone since the listing leaves `now`."""
        path = self.adapted_dir / (name + persistence.SUFFIX)  # its name is checked as the file is read
        if name in self._pretrained:  # the pretrained task stays served
            log.warning("ignoring %s: an adapted task has the name of a pretrained task", path)
            return
        try:
            info, meta = persistence.read_adapted_file(path, self.inventory)
        except FileNotFoundError:  # deleted since the listing: the next look says so
            self._forget(name)
            now.pop(name)
            return
        except InventoryError as exc:
            self.mark_broken(name, exc)
            return
        except OSError as exc:  # an I/O error, not the file's content: keep what was known, read it at the next look
            log.warning("cannot read %s now (%s); looking again later", path, exc)
            now.pop(name)
            if name in self._seen:
                now[name] = self._seen[name]
            return
        self._forget(name)
        if meta["format"] in ("routing", "composition", "arrow") and meta["fingerprint"] != self.inventory.fingerprint:
            log.warning("skipping adapted task %r: its routing was learnt for inventory %s, not %s",
                        name, meta["fingerprint"], self.inventory.fingerprint)
        else:
            self._tasks[name] = info
            self._meta[name] = meta

    def _forget(self, name: str) -> None:
        self._broken.pop(name, None)
        if name not in self._pretrained:
            self._tasks.pop(name, None)
            self._meta.pop(name, None)

    def _notify(self, names: list[str]) -> None:
        for name in names:
            for callback in self._listeners:
                callback(name)
