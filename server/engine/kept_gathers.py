"""What a decoding step keeps of its length groups' gathered keys and values for the next steps (decode_attention.py
gathers a group's keys into one (Hkv, n, L, d) tensor; on a CPU those copies were a tenth of a step).

    CrossGathers   T5's cross-attention: a row's encoder keys never change while it runs, so while the batch stays the
                   same they are gathered once, not once per step and layer. Cleared whenever encoder keys are written
                   (a block freed and written again may come back in a table).
Self-attention gathers are not kept: a copy grown by each step's new positions (tried in session 6) lost on
16 rows × 32 tokens (random T5 565 -> 526 tokens/s, demo 3491 -> 3369), because a group splits as its rows grow past
the gather limit and each new group paid a new copy; it won only on long rows (~8 %).
It keeps at most max_bytes: what was not used for a round of lookups makes room for a new copy; when everything
kept is in use (the running rows' keys need more than max_bytes), a new copy is not kept, and that group gathers every
step as if nothing were kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Gather = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> a group's keys, values (Hkv, n, L, d)
MAX_BYTES = 64 << 20


class CrossGathers:
    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self._kept: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, group key) -> keys, values
        self._used: dict[tuple, int] = {}  # the lookup that last used each
        self._lookups = 0
        self._bytes = 0

    def get(self, layer: int, group, gather: Gather) -> tuple[torch.Tensor, torch.Tensor]:
        """group: a decode_attention.LengthGroup (its `key`: the rows' encoder tables and lengths)."""
        key = (layer, group.key)
        self._lookups += 1
        found = self._kept.get(key)
        if found is not None:
            self._used[key] = self._lookups
            return found
        found = gather()
        self._keep(key, found)
        return found

    def clear(self) -> None:
        self._kept.clear()
        self._used.clear()
        self._bytes = 0

    def _keep(self, key: tuple, found: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Keep it where there is room, or where copies unused for a round of lookups (about one decoding step: each
        copy is looked up once a step while its group lasts) make room."""
        size = _nbytes(found)
        if size > self.max_bytes:
            return
        while self._bytes + size > self.max_bytes:
            oldest = min(self._used, key=self._used.get)
            if self._used[oldest] > self._lookups - 2 * (len(self._kept) + 1):
                return  # everything kept is in use: this one is not kept
            self._bytes -= _nbytes(self._kept.pop(oldest))
            del self._used[oldest]
        self._kept[key], self._used[key] = found, self._lookups
        self._bytes += size


def _nbytes(found: tuple[torch.Tensor, torch.Tensor]) -> int:
    return found[0].nbytes + found[1].nbytes
