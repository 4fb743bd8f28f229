"""LRU cache of task adapters on one device and dtype, bounded in bytes, thread-safe, single-flight.

    adapter = cache.get(key, compute)   # key = (inventory fingerprint, task name, task version, created)
    adapters = cache.get_many(keys, compute_many)   # misses computed together (one routing pass)
A hit moves the entry to the front; a miss runs `compute()` once even when many threads miss the same
key together (the others wait for that result), converts it to the cache's device and dtype, and
evicts least-recently-used entries until the bytes fit. An entry larger than the whole capacity is
returned but not kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from .adapter import TaskAdapter
from .lru import BytesLRU


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int  # computations; callers that waited on another thread's computation count as hits
    evictions: int
    bytes: int
    entries: int
    capacity_bytes: int


class AdapterCache:
    def __init__(self, capacity_bytes: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.device = torch.device(device)
        self.dtype = dtype
        self._entries: BytesLRU[TaskAdapter] = BytesLRU(capacity_bytes)
        self._inflight: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def get(self, key: Hashable, compute: Callable[[], TaskAdapter]) -> TaskAdapter:
        return self.get_many([key], lambda _: [compute()])[0]

    def get_many(self, keys: Sequence[Hashable], compute_many: Callable[[list[Hashable]], list[TaskAdapter]]
                 ) -> list[TaskAdapter]:
        """get() for several keys; the misses this call owns are computed together by one
        `compute_many(missing_keys)` call (e.g. routed in one pass over the inventory)."""
        owned: dict[Hashable, Future] = {}
        found: dict[Hashable, TaskAdapter | Future] = {}
        with self._lock:
            for key in dict.fromkeys(keys):
                hit = self._entries.get(key)
                if hit is not None:
                    self._hits += 1
                    found[key] = hit
                elif key in self._inflight:
                    self._hits += 1
                    found[key] = self._inflight[key]
                else:
                    owned[key] = self._inflight[key] = Future()
                    self._misses += 1
        if owned:
            missing = list(owned)
            found.update(self._compute(missing, lambda: compute_many(missing), list(owned.values())))
        return [found[key].result() if isinstance(found[key], Future) else found[key] for key in keys]

    def _compute(self, keys: list[Hashable], compute: Callable[[], list[TaskAdapter]], pending: list[Future]
                 ) -> dict[Hashable, TaskAdapter]:
        try:
            adapters = [a.to(self.device, self.dtype) for a in compute()]
        except BaseException as exc:
            with self._lock:
                for key in keys:
                    del self._inflight[key]
            for future in pending:
                future.set_exception(exc)
            raise
        with self._lock:
            for key, adapter in zip(keys, adapters, strict=True):
                del self._inflight[key]
                self._entries.put(key, adapter, adapter.nbytes)
        for future, adapter in zip(pending, adapters, strict=True):
            future.set_result(adapter)
        return dict(zip(keys, adapters, strict=True))

    def resize(self, capacity_bytes: int) -> None:
        """A new capacity in bytes (e.g. clamped by the memory plan); evicts least-recently-used entries to fit."""
        with self._lock:
            self.capacity_bytes = capacity_bytes
            self._entries.resize(capacity_bytes)

    def discard(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose key satisfies `predicate` (e.g. a deleted task); return how many."""
        with self._lock:
            return self._entries.discard(predicate)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._entries.evictions, self._entries.bytes,
                              len(self._entries), self.capacity_bytes)
