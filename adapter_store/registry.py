"""Task registry: names <-> router rows for pretrained tasks (`tasks.json`), plus adapted tasks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from .errors import InventoryError, TaskNameError
from .names import BASE_TASK, MU_TASK, validate_task_name

TASKS_FILE = "tasks.json"
TaskKind = Literal["pretrained", "adapted", "composed", "mu", "base", "broken"]


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: TaskKind
    version: int
    method: str  # "routed" (pretrained row), "mu", "composition", or the adaptation method: mhr-z | poly-z | mhr-mu
    row: int | None = None  # router row of a pretrained task
    created: float | None = None  # unix time an adapted or composed task was written
    recipe: tuple[tuple[str, float], ...] | None = None  # a composed task's members and their weights
    route: tuple[tuple[str, object], ...] | None = None  # a named Arrow task's route (arrow.ArrowSpec fields)
    reason: str | None = None  # a broken task's: its file and what is wrong with it


MU_INFO = TaskInfo(MU_TASK, "mu", 1, "mu")
BASE_INFO = TaskInfo(BASE_TASK, "base", 1, "none")  # the backbone alone: an adapter of zeros, never routed


class AdapterKey(NamedTuple):
    """Names one adapter's content: a task re-adapted gets a new version, one deleted and adapted again a new
    `created`, another inventory another fingerprint. The adapter cache and the row pool compare these."""

    fingerprint: str
    task: str  # a task's name, or a mix's canonical name
    version: int
    created: float | None
    members: tuple = ()  # a mix's or composed task's (member key, weight) pairs: a member's new version changes it


def read_pretrained_tasks(folder: Path, n_tasks: int) -> dict[str, TaskInfo]:
    """`tasks.json` is {name: row} or [name, ...] (row = position); absent -> task-0 … task-{n-1}."""
    path = folder / TASKS_FILE
    if not path.exists():
        rows = {f"task-{i}": i for i in range(n_tasks)}
    else:
        rows = _read_rows(path)
        _check_rows(path, rows, n_tasks)
    return {name: TaskInfo(name, "pretrained", 1, "routed", row=row) for name, row in rows.items()}


def _read_rows(path: Path) -> dict[str, int]:
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InventoryError(path, f"not valid JSON ({exc})") from exc
    if isinstance(raw, list):
        raw = {name: i for i, name in enumerate(raw)}
    if not isinstance(raw, dict):
        raise InventoryError(path, "expected {name: row} or a list of names")
    return raw


def _check_rows(path: Path, rows: dict, n_tasks: int) -> None:
    seen: dict[int, str] = {}
    for name, row in rows.items():
        try:
            validate_task_name(name)
        except TaskNameError as exc:
            raise InventoryError(path, str(exc), key=str(name)) from exc
        if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < n_tasks:
            raise InventoryError(path, f"row {row!r} does not exist: the router has rows 0..{n_tasks - 1}", key=name)
        if row in seen:
            raise InventoryError(path, f"row {row} is already named {seen[row]!r}", key=name)
        seen[row] = name
