"""One exception tree for the adapter store; the server maps each class to an HTTP status."""

from __future__ import annotations

import errno
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
    """A composed task names a task that no longer exists or is broken (or itself, through other compositions).
    `name`: the task or mix asked for (so a batch of several fails only its rows)."""

    def __init__(self, message: str, name: str | None = None):
        self.name = name
        super().__init__(message)


class BrokenTaskError(StoreError):
    """The task's file in the adapted folder cannot be served (truncated, wrong shapes, bad metadata): it answers
    409 naming the file until the file is written again or the task deleted."""

    def __init__(self, name: str, file: str, reason: str):
        self.name = name
        self.file = file
        self.reason = reason
        super().__init__(f"task {name!r} is broken: {file}: {reason}; adapt or compose it again with overwrite, or "
                         "delete it")


class StoreWriteError(StoreError):
    """A folder the store writes to refused the write (full disk, read-only, ...): nothing partial was left."""

    def __init__(self, folder: str | Path, error: OSError):
        self.folder = str(folder)
        self.errno = error.errno
        self.reason = error.strerror or str(error)
        super().__init__(f"cannot write to {self.folder}: {self.reason}")

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)
