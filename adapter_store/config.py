"""`adapter_config.json` of a PEFT Poly / MHR inventory, read and validated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import InventoryError

CONFIG_FILE = "adapter_config.json"


@dataclass(frozen=True)
class InventoryConfig:
    r: int
    n_tasks: int
    n_skills: int
    n_splits: int
    target_modules: tuple[str, ...] | str
    task_type: str | None
    base_model_name_or_path: str | None
    poly_type: str = "poly"

    @classmethod
    def read(cls, folder: str | Path) -> InventoryConfig:
        path = Path(folder) / CONFIG_FILE
        raw = _read_json(path)
        if raw.get("peft_type") != "POLY":
            raise InventoryError(
                path, f"peft_type is {raw.get('peft_type')!r}; only 'POLY' (Poly / MHR) is supported",
                key="peft_type",
            )
        if raw.get("poly_type", "poly") != "poly":
            raise InventoryError(path, f"poly_type {raw['poly_type']!r} is not supported", key="poly_type")
        ints = {name: _positive_int(path, raw, name) for name in ("r", "n_tasks", "n_skills", "n_splits")}
        targets = raw.get("target_modules")
        if not targets:
            raise InventoryError(path, "target_modules is missing or empty", key="target_modules")
        return cls(
            **ints,
            target_modules=targets if isinstance(targets, str) else tuple(targets),
            task_type=raw.get("task_type"),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
        )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise InventoryError(path, "file not found")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InventoryError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise InventoryError(path, "expected a JSON object")
    return raw


def _positive_int(path: Path, raw: dict, name: str) -> int:
    value = raw.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InventoryError(path, f"expected a positive integer, found {value!r}", key=name)
    return value
