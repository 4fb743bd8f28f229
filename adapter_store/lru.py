"""An LRU map bounded by the total size of its values, in bytes, given on insertion.

Used for the adapter cache's entries and for adapted tasks' routing logits. Not thread-safe on its own:
each user holds its own lock around it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class BytesLRU(Generic[V]):
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        """The value (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def resize(self, capacity_bytes: int) -> None:
        """A new capacity; least-recently-used entries go until the rest fits."""
        self.capacity_bytes = capacity_bytes
        while self._entries and self.bytes > capacity_bytes:
            self.bytes -= self._entries.popitem(last=False)[1][1]
            self.evictions += 1

    def put(self, key: Hashable, value: V, size: int) -> None:
        """Insert, evicting least-recently-used entries until it fits; a value larger than the capacity
        is not kept."""
        if size > self.capacity_bytes:
            return
        if key in self._entries:
            self.bytes -= self._entries.pop(key)[1]
        while self._entries and self.bytes + size > self.capacity_bytes:
            self.bytes -= self._entries.popitem(last=False)[1][1]
            self.evictions += 1
        self._entries[key] = (value, size)
        self.bytes += size

    def discard(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose key satisfies `predicate`; return how many."""
        doomed = [key for key in self._entries if predicate(key)]
        for key in doomed:
            self.bytes -= self._entries.pop(key)[1]
        return len(doomed)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
