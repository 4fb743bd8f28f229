"""/score work between decoding steps: (row, choice) pairs of every waiting score request, taken in chunks.

A score request's rows become one pair per choice. Each chunk — the next `chunk_pairs` pairs in arrival order,
across requests — is one teacher-forced forward with each pair's task adapter; a request is answered when its
last pair is scored.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from adapter_store import AdapterKey, TaskAdapter

from .rows import ChoiceLogprob, ScoreRow


@dataclass
class RowScores:
    choices: list[ChoiceLogprob]
    version: int | None  # the version of the task's adapter that scored them


class ScoreJob:
    def __init__(self, rows: Sequence[ScoreRow]):
        self.rows = list(rows)
        self.pairs = [(row, choice) for row in self.rows for choice in row.choices]
        self.future: Future[list[RowScores]] = Future()
        self.pinned: dict[str, tuple[TaskAdapter, Hashable]] = {}
        self._scores: list[tuple[float, int] | None] = [None] * len(self.pairs)
        self._remaining = len(self.pairs)
        self.next_pair = 0
        if not self.pairs:
            self.future.set_result([RowScores([], None) for _ in self.rows])

    def record(self, pair: int, logprob_sum: float, tokens: int) -> None:
        self._scores[pair] = (logprob_sum, tokens)
        self._remaining -= 1
        if self._remaining == 0 and not self.future.done():
            self.future.set_result(self._results())

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def _results(self) -> list[RowScores]:
        out, start = [], 0
        for row in self.rows:
            mine = self._scores[start: start + len(row.choices)]
            start += len(row.choices)
            key = self.pinned[row.task][1]
            choices = [ChoiceLogprob(c, s, s / max(n, 1), n) for c, (s, n) in zip(row.choices, mine, strict=True)]
            out.append(RowScores(choices, key.version if isinstance(key, AdapterKey) else None))
        return out


@dataclass
class Chunk:
    """Pairs to score in one forward: (job, pair index) and the texts."""

    members: list[tuple[ScoreJob, int]]


class ScoreQueue:
    def __init__(self, chunk_pairs: int):
        self.chunk_pairs = chunk_pairs
        self._jobs: deque[ScoreJob] = deque()

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def add(self, job: ScoreJob) -> None:
        if job.pairs:
            self._jobs.append(job)

    def next_chunk(self) -> Chunk:
        """The next pairs in arrival order (call only when the queue is not empty)."""
        members: list[tuple[ScoreJob, int]] = []
        while self._jobs and len(members) < self.chunk_pairs:
            job = self._jobs[0]
            take = min(self.chunk_pairs - len(members), len(job.pairs) - job.next_pair)
            members += [(job, job.next_pair + i) for i in range(take)]
            job.next_pair += take
            if job.next_pair == len(job.pairs):
                self._jobs.popleft()
        return Chunk(members)

    def drain(self, fail: Callable[[ScoreJob], None]) -> None:
        while self._jobs:
            fail(self._jobs.popleft())
