"""Task names: the only strings that ever become file names under `adapted/`."""

from __future__ import annotations

import re

from .errors import TaskNameError

TASK_NAME_PATTERN = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}"
MU_TASK = "__mu__"  # reserved: the μ adapter (uniform weights over the skills)
BASE_TASK = "__base__"  # reserved: the backbone alone, no adapter

_TASK_NAME = re.compile(TASK_NAME_PATTERN)


def validate_task_name(name: object) -> str:
    """Return `name` if it is 1..64 chars of [A-Za-z0-9._-], not starting with a dot; else raise."""
    if not isinstance(name, str):
        raise TaskNameError(f"task name must be a string, got {type(name).__name__}")
    if not _TASK_NAME.fullmatch(name):
        raise TaskNameError(
            f"invalid task name {name!r}: use 1 to 64 characters from [A-Za-z0-9._-], not starting with '.'"
        )
    if name == MU_TASK:
        raise TaskNameError(f"task name {MU_TASK!r} is reserved for the μ adapter")
    if name == BASE_TASK:
        raise TaskNameError(f"task name {BASE_TASK!r} is reserved for the backbone with no adapter")
    return name
