"""One exception tree for the adapter store; the server maps each class to an HTTP status."""

from __future__ import annotations

from pathlib import Path


class StoreError(Exception):
    """Base class of every error the adapter store raises on purpose."""


class InventoryError(StoreError):
    """The inventory on disk is missing, corrupt or inconsistent.

    The message always names the file and, where there is one, the key.
    """

    def __init__(self, file: str | Path, problem: str, *, key: str | None = None):
        self.file = str(file)
        self.key = key
        self.problem = problem
        where = f"{self.file}" + (f" [key {key!r}]" if key else "")
        super().__init__(f"{where}: {problem}")


class TaskNameError(StoreError, ValueError):
    """A task name outside the safe alphabet (it could otherwise become a path)."""


class UnknownTaskError(StoreError, KeyError):
    """No task of that name in the registry."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(name)

    def __str__(self) -> str:
        return f"unknown task {self.name!r}"


class TaskConflictError(StoreError):
    """The operation would overwrite or delete something that must stay (a pretrained task)."""


class BrokenCompositionError(StoreError):
    """A composed task names a task that no longer exists (or itself, through other compositions)."""
