"""A small thread-safe LRU map bounded by the bytes of its values (e.g. adapted tasks' routing logits)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch


class TensorsLRU:
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Hashable, tuple[list[torch.Tensor], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> list[torch.Tensor] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, tensors: Sequence[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.capacity_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            while self._entries and self._bytes + size > self.capacity_bytes:
                self._bytes -= self._entries.popitem(last=False)[1][1]
            self._entries[key] = (list(tensors), size)
            self._bytes += size

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
