"""Adapted tasks on disk: `adapted/<name>.safetensors`, written atomically, read lazily. This module owns the
file layout; the store deals in logits and adapters.

Three payloads, told apart by the header's `format`:
    routing      <module>.module_logits (H*K,)          -- MHR-z / Poly-z: one logits row per layer
    lora         <module>.lora_A (d_in, r), .lora_B (r, d_out)  -- MHR-μ: a plain LoRA, scale 1/r
    composition  no tensors; header `recipe`: {"task": weight, ...}  -- a named mix, resolved when served
    arrow        no tensors; header `route`: {"over", "top_k", "temperature"}  -- a named Arrow route (arrow.py)
Header metadata (strings): format, method, version, created, fingerprint, rank (and recipe).

Several processes may share one folder (replicas of a cluster): `signatures` tells a reader cheaply which files
changed since it last looked (inode, size, mtime: os.replace gives a new inode), and `folder_lock` serialises
writers that number versions (an advisory lock on `<folder>/.lock`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import arrow_spec
from .adapter import TaskAdapter
from .errors import InventoryError, StoreWriteError, TaskNameError
from .inventory import Inventory, ModuleGroup
from .names import validate_task_name
from .registry import TaskInfo

ADAPTED_DIR = "adapted"
SUFFIX = ".safetensors"
LOGITS_SUFFIX = ".module_logits"
LORA_A_SUFFIX = ".lora_A"
LORA_B_SUFFIX = ".lora_B"
TEMP_PREFIX = ".tmp-"  # task names never start with a dot, so a temp file is never a task
LOCK_FILE = ".lock"


class Signature(NamedTuple):
    """What tells one version of a file from the next: a rewrite (os.replace) gets a new inode."""

    inode: int
    size: int
    mtime_ns: int


def atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temp file in the same folder, fsync, rename over `path`, fsync the folder. StoreWriteError
    naming the folder if it refuses (full disk, read-only): then nothing is left and an older `path` is intact."""
    with writing_to(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=SUFFIX, dir=path.parent)
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


@contextmanager
def writing_to(folder: Path) -> Iterator[None]:
    """Turn an OSError of a write into StoreWriteError naming the folder (a missing file stays FileNotFoundError).
    safetensors reports a failed write as its own error wrapping the OSError's text: that counts too."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreWriteError(folder, exc) from exc
    except SafetensorError as exc:
        found = re.search(r"os error (\d+)", str(exc))  # e.g. "No space left on device (os error 28)"
        if found is None:
            raise
        code = int(found.group(1))
        raise StoreWriteError(folder, OSError(code, os.strerror(code))) from exc


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_files(folder: Path, older_than_s: float = 0.0) -> list[Path]:
    """Delete temp files left by a process killed mid-write; return what was removed. A folder shared with live
    writers passes older_than_s, so a temp file another process is writing right now is left alone."""
    leftovers = list(folder.glob(TEMP_PREFIX + "*")) if folder.is_dir() else []
    if older_than_s > 0:
        cutoff = time.time() - older_than_s
        leftovers = [path for path in leftovers if _mtime(path) < cutoff]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")  # gone already: nothing to remove


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the folder (flock on `<folder>/.lock`) against other processes."""
    with writing_to(folder):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def signatures(folder: Path) -> dict[str, Signature]:
    """Name -> Signature of every adapted or composed task's file (one stat each, no file opened)."""
    found = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return found
    for entry in entries:
        if not entry.name.endswith(SUFFIX) or entry.name.startswith(TEMP_PREFIX):
            continue
        try:
            stat = entry.stat()
        except FileNotFoundError:  # deleted since the listing
            continue
        found[entry.name[: -len(SUFFIX)]] = Signature(stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return found


def signature(path: Path) -> Signature | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return Signature(stat.st_ino, stat.st_size, stat.st_mtime_ns)


def task_path(folder: Path, name: str) -> Path:
    return folder / (validate_task_name(name) + SUFFIX)


def remove_task_file(folder: Path, name: str) -> None:
    with writing_to(folder):
        task_path(folder, name).unlink(missing_ok=True)


def write_adapted(folder: Path, info: TaskInfo, fmt: str, tensors: dict[str, torch.Tensor], fingerprint: str,
                  rank: int, **extra: str) -> None:
    metadata = {
        "format": fmt, "method": info.method, "version": str(info.version),
        "created": repr(info.created or time.time()), "fingerprint": fingerprint, "rank": str(rank), **extra,
    }
    atomic_save(task_path(folder, info.name), tensors, metadata)


def write_composition(folder: Path, info: TaskInfo, fingerprint: str, rank: int) -> None:
    write_adapted(folder, info, "composition", {}, fingerprint, rank, recipe=json.dumps(dict(info.recipe)))


def read_adapted_file(path: Path, inventory: Inventory) -> tuple[TaskInfo, dict[str, str]]:
    """One adapted or composed task's TaskInfo and header metadata, the file checked from its header alone (no
    tensor data read): name, metadata, recipe, and each tensor's key and shape against the inventory. InventoryError
    naming the file (and key) if anything is wrong; FileNotFoundError if it is gone."""
    name = path.name[: -len(SUFFIX)]
    try:
        validate_task_name(name)
    except TaskNameError as exc:
        raise InventoryError(path, f"adapted task file with an invalid name ({exc})") from exc
    meta, shapes = _read_header(path)
    recipe = _recipe(path, meta) if meta["format"] == "composition" else None
    route = arrow_spec.read_route(path, meta) if meta["format"] == "arrow" else None
    _check_shapes(path, shapes, expected_shapes(path, meta, inventory))
    kind = "composed" if recipe is not None or route is not None else "adapted"
    return TaskInfo(name, kind, _number(path, meta, "version", int), meta["method"],
                    created=_number(path, meta, "created", float), recipe=recipe, route=route), meta


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The header metadata and each tensor's shape. OSError for an I/O error (the file's content may be fine)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except OSError:
        raise
    except Exception as exc:
        raise InventoryError(path, f"cannot read safetensors header ({exc})") from exc
    for key in ("format", "method", "version", "created", "fingerprint", "rank"):
        if key not in meta:
            raise InventoryError(path, "missing header metadata", key=key)
    if meta["format"] not in ("routing", "lora", "composition", "arrow"):
        raise InventoryError(path, f"unknown format {meta['format']!r}", key="format")
    return meta, shapes


def _number(path: Path, meta: dict[str, str], key: str, kind: type) -> int | float:
    try:
        return kind(meta[key])
    except ValueError:
        raise InventoryError(path, f"not a number: {meta[key]!r}", key=key) from None


def expected_shapes(path: Path, meta: dict[str, str], inventory: Inventory) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor a file of this format holds for the inventory."""
    if meta["format"] == "routing":
        width = inventory.config.n_splits * inventory.config.n_skills
        return {name + LOGITS_SUFFIX: (width,) for name in inventory.module_names}
    if meta["format"] == "lora":
        rank = _number(path, meta, "rank", int)
        return {key: shape for name, (d_in, d_out) in inventory.module_shapes.items()
                for key, shape in ((name + LORA_A_SUFFIX, (d_in, rank)), (name + LORA_B_SUFFIX, (rank, d_out)))}
    return {}


def _check_shapes(path: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
    for key, shape in expected.items():
        if key not in found:
            raise InventoryError(path, "missing key", key=key)
        if found[key] != shape:
            raise InventoryError(path, f"expected shape {shape}, found {found[key]}", key=key)


def _recipe(path: Path, meta: dict[str, str]) -> tuple[tuple[str, float], ...]:
    try:
        recipe = json.loads(meta["recipe"])
        return tuple(sorted((str(task), float(weight)) for task, weight in recipe.items()))
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise InventoryError(path, f"a composition without a readable recipe ({exc})", key="recipe") from exc


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (small) adapted-task file; one read, ~4x faster than a get_tensor per key."""
    try:
        return safetensors.torch.load(path.read_bytes())
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise InventoryError(path, f"cannot read safetensors data ({exc})") from exc


# ---- payloads ---------------------------------------------------------------------------------
def encode_routing(groups: tuple[ModuleGroup, ...], logits: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits per module group [(L, H*K), ...] -> one (H*K,) tensor per module."""
    return {module + LOGITS_SUFFIX: z[i].float()
            for group, z in zip(groups, logits, strict=True) for i, module in enumerate(group.names)}


def decode_routing(path: Path, tensors: dict[str, torch.Tensor], groups: tuple[ModuleGroup, ...],
                   width: int) -> list[torch.Tensor]:
    """The inverse of encode_routing, every key and shape checked: [(L, H*K), ...]."""
    return [torch.stack([_tensor(path, tensors, name + LOGITS_SUFFIX, (width,)) for name in group.names]).float()
            for group in groups]


def encode_lora(adapter: TaskAdapter) -> dict[str, torch.Tensor]:
    """A plain LoRA -> A (d_in, r) and B (r, d_out) per module."""
    tensors = {}
    for module, a, b in adapter.layers():
        tensors[module + LORA_A_SUFFIX] = a.float()
        tensors[module + LORA_B_SUFFIX] = b.float()
    return tensors


def decode_lora(path: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                rank: int) -> TaskAdapter:
    """The inverse of encode_lora for modules of the given (d_in, d_out), every key and shape checked."""
    layers = {
        name: (_tensor(path, tensors, name + LORA_A_SUFFIX, (d_in, rank)).float(),
               _tensor(path, tensors, name + LORA_B_SUFFIX, (rank, d_out)).float())
        for name, (d_in, d_out) in shapes.items()
    }
    return TaskAdapter.from_layers(layers, rank)


def _tensor(path: Path, tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in tensors:
        raise InventoryError(path, "missing key", key=key)
    if tuple(tensors[key].shape) != shape:
        raise InventoryError(path, f"expected shape {shape}, found {tuple(tensors[key].shape)}", key=key)
    return tensors[key]
