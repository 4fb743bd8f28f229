"""The engine: one backbone with every target linear wrapped once, adapters from the cache, batches
that mix tasks. Its methods are synchronous and run on one worker thread (the batcher's)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from itertools import groupby

from adapter_store import AdapterCache, AdapterStore, TaskAdapter, check_model

from .activation import AdapterSlots
from .generation import generate_rows
from .loader import LoadedModel
from .requests import ChoiceScore, Completion, GenerateRow, SamplingParams, ScoreRow
from .scoring import score_pairs


class Engine:
    def __init__(self, loaded: LoadedModel, store: AdapterStore, cache: AdapterCache, *,
                 merge_single_task: bool = True):
        check_model(store.inventory, loaded.model)
        self.loaded = loaded
        self.merge_single_task = merge_single_task  # single-task batches on temporarily merged weights
        self.store = store
        self.cache = cache
        self.slots = AdapterSlots(loaded.model, store.inventory.module_names)
        self.lock = threading.Lock()  # one forward at a time: serving batches and adaptation steps

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def adapter(self, task: str) -> TaskAdapter:
        """The task's adapter on the engine's device and dtype; routed at most once per version."""
        return self.cache.get(self.store.cache_key(task), lambda: self.store.adapter(task))

    def generate(self, rows: Sequence[GenerateRow]) -> list[Completion]:
        """Rows may mix tasks and sampling parameters; rows with equal batch keys share one call."""
        results: dict[int, Completion] = {}
        order = sorted(range(len(rows)), key=lambda i: rows[i].params.batch_key())
        for _, members in groupby(order, key=lambda i: rows[i].params.batch_key()):
            members = list(members)
            batch = [rows[i] for i in members]
            for i, completion in zip(members, self._generate_call(batch), strict=True):
                results[i] = completion
        return [results[i] for i in range(len(rows))]

    def _generate_call(self, rows: list[GenerateRow]) -> list[Completion]:
        return self.generate_with([self.adapter(row.task) for row in rows], rows)

    def generate_with(self, adapters: Sequence[TaskAdapter], rows: Sequence[GenerateRow]) -> list[Completion]:
        """Generate with explicit adapters, one per row (e.g. an adapter still being trained)."""
        m = self.loaded
        with self.lock, self.slots.activate(adapters, merge=self.merge_single_task):
            return generate_rows(m.model, m.tokenizer, m.is_seq2seq, m.device, list(rows))

    def score(self, rows: Sequence[ScoreRow]) -> list[list[ChoiceScore]]:
        """Every (row, choice) pair in one forward pass, each pair with its row's task adapter."""
        pairs = [(row, choice) for row in rows for choice in row.choices]
        adapters = [self.adapter(row.task) for row, _ in pairs]
        m = self.loaded
        with self.lock, self.slots.activate(adapters, merge=self.merge_single_task):
            scored = score_pairs(m.model, m.tokenizer, m.is_seq2seq, m.device,
                                 [row.text for row, _ in pairs], [choice for _, choice in pairs])
        results, start = [], 0
        for row in rows:
            mine = scored[start: start + len(row.choices)]
            start += len(row.choices)
            results.append([ChoiceScore(c, s, s / max(n, 1), n) for c, (s, n) in zip(row.choices, mine, strict=True)])
        return results

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def warm_up(self) -> None:
        """Route the μ adapter once and run one tiny generation, so the first request is not slow."""
        self.generate([GenerateRow("__mu__", "warm up", _WARM_UP)])


_WARM_UP = SamplingParams(max_new_tokens=2)
