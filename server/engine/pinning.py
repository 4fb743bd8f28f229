"""Each request's adapters, resolved once per task when its first row starts (misses routed together), so all
its rows run the same version and the response can name it."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from adapter_store import StoreError, TaskAdapter, TaskRef

from .score_queue import ScoreJob
from .sequence import ExplicitKey, GenerateJob

# tasks -> (their adapters, their cache keys), misses routed together: Engine.adapters_and_keys
Resolve = Callable[[Sequence[TaskRef]], tuple[list[TaskAdapter], list[Hashable]]]


def pin(resolve: Resolve, jobs: Sequence[GenerateJob | ScoreJob]) -> bool:
    """Give each job one adapter per task; jobs asking for a task that is gone fail. False if any job failed."""
    missing = list(dict.fromkeys(t for job in jobs for t in _tasks_of(job) if t not in job.pinned))
    found, failed = _resolve(resolve, missing)
    for job in jobs:
        for task in _tasks_of(job):
            if task in failed:
                job.fail(failed[task])
            elif task in found and task not in job.pinned:
                job.pinned[task] = found[task]
    return not failed


def pinned(job: GenerateJob, row) -> tuple:
    """The (adapter, key) a row runs with: its job's pinned task adapter, or its explicit one (e.g. an adapter
    being trained), under a key of its own."""
    if row.adapter is not None:
        return job.pinned.setdefault(("explicit", id(row.adapter)), (row.adapter, ExplicitKey()))
    return job.pinned[row.task]


def _resolve(resolve: Resolve, tasks: list[TaskRef]) -> tuple[dict, dict[TaskRef, BaseException]]:
    failed: dict[TaskRef, BaseException] = {}
    while tasks:
        try:
            adapters, keys = resolve(tasks)
            return dict(zip(tasks, zip(adapters, keys, strict=True), strict=True)), failed
        except StoreError as exc:  # e.g. a task deleted while its request waited
            bad = getattr(exc, "name", None)
            if bad not in tasks:
                return {}, {**failed, **dict.fromkeys(tasks, exc)}
            failed[bad] = exc
            tasks = [t for t in tasks if t != bad]
    return {}, failed


def _tasks_of(job: GenerateJob | ScoreJob) -> list[TaskRef]:
    return [row.task for row in job.rows if getattr(row, "adapter", None) is None]
