"""The engine: one backbone with every target linear wrapped once, adapters from the cache, batches
that mix tasks. Its methods are synchronous and run on one worker thread (the batcher's)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Sequence
from itertools import groupby

from adapter_store import AdapterCache, AdapterStore, TaskAdapter, check_model

from .activation import AdapterSlots
from .generation import generate_rows
from .loader import LoadedModel, ModelLoadError
from .prepack import fits_in_memory, prepack_supported
from .requests import ChoiceScore, Completion, GenerateRow, SamplingParams, ScoreRow
from .scoring import score_pairs

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, loaded: LoadedModel, store: AdapterStore, cache: AdapterCache, *,
                 merge_single_task: bool = True, pool_rows: int = 64, prepack_weights: bool | None = None):
        check_model(store.inventory, loaded.model)
        self.loaded = loaded
        self.merge_single_task = merge_single_task  # single-task batches on temporarily merged weights
        self.store = store
        self.cache = cache
        # adapters of mixed batches stay in place between batches, for batches of up to pool_rows rows
        self.slots = AdapterSlots(loaded.model, store.inventory.module_names, pool_rows=pool_rows)
        self.lock = threading.Lock()  # one forward at a time: serving batches and adaptation steps
        self.prepacked = self._prepack(prepack_weights, pool_rows)

    def _prepack(self, wanted: bool | None, rows_hint: int) -> bool:
        """None: where oneDNN can (CPU), the layers large enough to gain, if their copies fit in half of the
        available memory; True: every wrapped layer, and a start-up error where it cannot; False: none."""
        if wanted is False:
            return False
        supported = prepack_supported(self.loaded.device, self.loaded.dtype)
        if wanted is None and supported:
            nbytes = self.slots.bytes_to_pack()
            if not fits_in_memory(nbytes):
                log.warning("not prepacking weights: their copies (%d MiB) would take over half of the available "
                            "memory (set MHR_PREPACK_WEIGHTS=true to pack anyway)", nbytes >> 20)
                return False
        packed = supported and self.slots.prepack(rows_hint, every_layer=bool(wanted)) > 0
        if wanted and not packed:
            raise ModelLoadError(f"prepack_weights: oneDNN cannot pack {self.loaded.dtype} weights on "
                                 f"{self.loaded.device} here; leave it unset (auto) or set it to false")
        return packed

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def adapter(self, task: str) -> TaskAdapter:
        """The task's adapter on the engine's device and dtype; routed at most once per version."""
        return self.adapters_and_keys([task])[0][0]

    def adapters_and_keys(self, tasks: Sequence[str]) -> tuple[list[TaskAdapter], list[Hashable]]:
        """Each task's adapter and the cache key that names its content. Misses are routed together (one
        pass over the inventory). Consistent even if a new version of a task lands meanwhile: then the
        entry, possibly routed from the newer version, is dropped and redone."""
        while True:
            keys = [self.store.cache_key(task) for task in tasks]
            task_of = dict(zip(keys, tasks, strict=True))
            adapters = self.cache.get_many(keys, lambda missing, task_of=task_of: self.store.adapters(
                [task_of[k] for k in missing]))
            stale = {key for key, task in zip(keys, tasks, strict=True) if self.store.cache_key(task) != key}
            if not stale:
                return adapters, keys
            self.cache.discard(lambda key, stale=stale: key in stale)

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
        adapters, keys = self.adapters_and_keys([row.task for row in rows])
        if rows[0].params.do_sample:  # sampling draws its random numbers in row order: keep the input order
            keys = None
        return self.generate_with(adapters, rows, keys=keys)

    def generate_with(self, adapters: Sequence[TaskAdapter], rows: Sequence[GenerateRow], *,
                      keys: Sequence[Hashable] | None = None) -> list[Completion]:
        """Generate with explicit adapters, one per row (e.g. an adapter still being trained). `keys` name
        adapters that never change (cache keys), so they may stay in place for the next batch."""
        m = self.loaded
        with self.lock, self.slots.activate(adapters, keys=keys, merge=self.merge_single_task) as order:
            done = generate_rows(m.model, m.tokenizer, m.is_seq2seq, m.device, [rows[i] for i in order])
        return in_input_order(order, done)

    def score(self, rows: Sequence[ScoreRow]) -> list[list[ChoiceScore]]:
        """Every (row, choice) pair in one forward pass, each pair with its row's task adapter."""
        pairs = [(row, choice) for row in rows for choice in row.choices]
        if not pairs:
            return [[] for _ in rows]
        adapters, keys = self.adapters_and_keys([row.task for row, _ in pairs])
        m = self.loaded
        with self.lock, self.slots.activate(adapters, keys=keys, merge=self.merge_single_task) as order:
            scored = score_pairs(m.model, m.tokenizer, m.is_seq2seq, m.device,
                                 [pairs[i][0].text for i in order], [pairs[i][1] for i in order])
        scored = in_input_order(order, scored)
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


def in_input_order(order: list[int], results: list) -> list:
    """Results of rows run in `order` (position p ran input row order[p]) -> results in input order."""
    out = [None] * len(order)
    for position, row in enumerate(order):
        out[row] = results[position]
    return out
