"""Read a PEFT Poly / MHR inventory from safetensors, validate every module, stack by shape.

Keys in `adapter_model.safetensors` (PEFT strips the adapter name when saving):
    base_model.model.<module>.poly_lora_A                (H, K, d_in/H, r)
    base_model.model.<module>.poly_lora_B                (H, K, r, d_out/H)
    base_model.model.<module>.poly_router.module_logits  (n_tasks, H*K)
Modules of one shape are stacked into a `ModuleGroup`, skill-major, so routing a task is K fused
multiply-adds over contiguous blocks per group instead of two small einsums per layer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from .config import InventoryConfig
from .errors import InventoryError

WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
SUFFIX_A = ".poly_lora_A"
SUFFIX_B = ".poly_lora_B"
SUFFIX_LOGITS = ".poly_router.module_logits"


@dataclass(frozen=True)
class ModuleGroup:
    """Modules whose skills have the same shape, stacked skill-major (K first) over a layer axis L.

    lora_a[k, i] is PEFT's poly_lora_A[:, k] of module names[i]; skill-major makes each skill's block
    over all layers contiguous, which makes mixing memory-bound instead of overhead-bound.
    """

    names: tuple[str, ...]  # module paths in the base model, e.g. "encoder.block.0.layer.0.SelfAttention.q"
    lora_a: torch.Tensor  # (K, L, H, d_in/H, r)
    lora_b: torch.Tensor  # (K, L, H, r, d_out/H)
    logits: torch.Tensor  # (L, n_tasks, H*K)

    @property
    def d_in(self) -> int:
        _, _, h, d, _ = self.lora_a.shape
        return h * d

    @property
    def d_out(self) -> int:
        _, _, h, _, d = self.lora_b.shape
        return h * d

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.lora_a, self.lora_b, self.logits))


@dataclass(frozen=True)
class Inventory:
    folder: Path
    config: InventoryConfig
    groups: tuple[ModuleGroup, ...]
    fingerprint: str  # sha256 of the weights and config files (16 hex digits)

    @classmethod
    def read(cls, folder: str | Path) -> Inventory:
        folder = Path(folder)
        if not folder.is_dir():
            raise InventoryError(folder, "inventory folder not found")
        config = InventoryConfig.read(folder)
        path = folder / WEIGHTS_FILE
        if not path.is_file():
            raise InventoryError(path, "file not found")
        groups = _read_groups(path, config)
        return cls(folder, config, groups, _fingerprint(path, folder / "adapter_config.json"))

    @property
    def module_names(self) -> list[str]:
        return [name for group in self.groups for name in group.names]

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Module path -> (d_in, d_out) of the linear layer it adapts."""
        return {name: (g.d_in, g.d_out) for g in self.groups for name in g.names}

    @property
    def nbytes(self) -> int:
        return sum(group.nbytes for group in self.groups)

    @property
    def skills_nbytes(self) -> int:
        """The skills alone (what routing reads), without the router logits."""
        return sum(t.numel() * t.element_size() for g in self.groups for t in (g.lora_a, g.lora_b))

    def skills_on(self, device: torch.device | str) -> Inventory:
        """The same inventory with its skills on `device` (float32, as read), so that routing runs there: on a GPU,
        U tasks route in a few kernels instead of tens of milliseconds of memory traffic on the host."""
        return replace(self, groups=tuple(replace(g, lora_a=g.lora_a.to(device), lora_b=g.lora_b.to(device))
                                          for g in self.groups))


def _read_groups(path: Path, config: InventoryConfig) -> tuple[ModuleGroup, ...]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            modules = _module_shapes(path, handle, config)
            by_shape: dict[tuple[int, int], list[str]] = {}
            for name, shape in modules.items():
                by_shape.setdefault(shape, []).append(name)
            return tuple(_load_group(path, handle, keys) for keys in by_shape.values())
    except InventoryError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt bytes
        raise InventoryError(path, f"cannot read safetensors data ({type(exc).__name__}: {exc})") from exc


def _module_shapes(path: Path, handle, config: InventoryConfig) -> dict[str, tuple[int, int]]:
    """Validate every key's shape without reading data; return key prefix -> (d_in/H, d_out/H)."""
    keys = set(handle.keys())
    modules = sorted(k[: -len(SUFFIX_A)] for k in keys if k.endswith(SUFFIX_A))
    if not modules:
        raise InventoryError(path, f"no '*{SUFFIX_A}' keys: not a Poly / MHR inventory")
    unexpected = keys - {m + s for m in modules for s in (SUFFIX_A, SUFFIX_B, SUFFIX_LOGITS)}
    if unexpected:
        raise InventoryError(path, "unexpected key (not part of a Poly module)", key=sorted(unexpected)[0])
    h, k, r, n_tasks = config.n_splits, config.n_skills, config.r, config.n_tasks
    shapes = {}
    for module in modules:
        a = _shape(path, handle, keys, module + SUFFIX_A)
        b = _shape(path, handle, keys, module + SUFFIX_B)
        _expect(path, module + SUFFIX_A, a, (h, k, a[2] if len(a) == 4 else "d_in/H", r))
        _expect(path, module + SUFFIX_B, b, (h, k, r, b[3] if len(b) == 4 else "d_out/H"))
        _expect(path, module + SUFFIX_LOGITS, _shape(path, handle, keys, module + SUFFIX_LOGITS), (n_tasks, h * k))
        shapes[module] = (a[2], b[3])
    return shapes


def _shape(path: Path, handle, keys: set[str], key: str) -> tuple[int, ...]:
    if key not in keys:
        raise InventoryError(path, "missing key", key=key)
    return tuple(handle.get_slice(key).get_shape())


def _expect(path: Path, key: str, found: tuple[int, ...], expected: tuple) -> None:
    if found != expected:
        raise InventoryError(path, f"expected shape {tuple(expected)}, found {tuple(found)}", key=key)


def _module_path(key_module: str) -> str:
    return key_module[len(PEFT_PREFIX):] if key_module.startswith(PEFT_PREFIX) else key_module


def _load_group(path: Path, handle, key_prefixes: list[str]) -> ModuleGroup:
    """Copy each module into preallocated float32 stacks (peak memory: the stacks + one module)."""

    def stack(suffix: str, skill_major: bool) -> torch.Tensor:
        first = handle.get_slice(key_prefixes[0] + suffix).get_shape()  # (H, K, ...) or (n_tasks, H*K)
        shape = (first[1], len(key_prefixes), first[0], *first[2:]) if skill_major else (len(key_prefixes), *first)
        out = torch.empty(shape, dtype=torch.float32)
        for i, prefix in enumerate(key_prefixes):
            tensor = handle.get_tensor(prefix + suffix)
            if not torch.isfinite(tensor).all():
                raise InventoryError(path, "tensor contains NaN or infinity", key=prefix + suffix)
            if skill_major:
                out[:, i].copy_(tensor.transpose(0, 1))  # (H, K, ...) -> (K, H, ...)
            else:
                out[i].copy_(tensor)
        return out

    names = tuple(_module_path(prefix) for prefix in key_prefixes)
    return ModuleGroup(names, stack(SUFFIX_A, True), stack(SUFFIX_B, True), stack(SUFFIX_LOGITS, False))


def _fingerprint(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]
