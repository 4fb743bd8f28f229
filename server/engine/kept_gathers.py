"""What a decoding step keeps of its length groups' gathered keys and values for the next steps (decode_attention.py
gathers a group's keys into one (Hkv, n, L, d) tensor; on a CPU that copy was a tenth of a step).

    CrossGathers   T5's cross-attention: a row's encoder keys never change while it runs, so while the batch stays the
                   same they are gathered once, not once per step and layer. Cleared whenever encoder keys are written
                   (a block freed and written again may come back in a table). The rows' cross-attention length
                   groups are kept too while the rows stay (`groups`).
    SelfGathers    self-attention: while a group keeps its rows and each gains one position per step, the step writes
                   the n new positions into the kept copy instead of gathering n · L again. Keyed by the rows' KV
                   serials (paged_kv.RowKV.serial): a row's positions never change once written, and a beam that
                   follows its parent or a row computed again after preemption has a new serial. Only on a CPU
                   (paged_kv.py: on a GPU a gather is one launch, growing a copy two per tensor), and only for groups
                   at least MIN_WIDTH positions wide: a short gather costs less than the writes into a kept copy.
                   (Reverted in session 6, when groups split as their rows grew past the then 2^17 gather cap and each
                   new group paid a new copy; back in session 7 with the 2^22 cap: 16 tasks × 16 rows at 100 input
                   and 160 new tokens, +3-12 % random T5, +5-10 % demo, interleaved in one process.)
Each keeps at most max_bytes: what was not used for a round of lookups makes room for a new copy; when everything
kept is in use (the running rows' keys need more than max_bytes), a new copy is not kept, and that group gathers as if
nothing were kept (no copy into room that would be dropped again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .int_tensors import long_tensor

Gather = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> a group's keys, values (Hkv, n, L, d)
MAX_BYTES = 64 << 20
MARGIN = 32  # positions a kept self-attention copy has room to grow by before it is gathered anew
MIN_WIDTH = 64  # narrower groups gather every step: a short gather costs less than the writes into a kept copy


class _Kept:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._kept: dict[tuple, object] = {}
        self._sizes: dict[tuple, int] = {}
        self._used: dict[tuple, int] = {}  # the lookup that last used each
        self._lookups = 0
        self._bytes = 0

    def _find(self, key: tuple):
        self._lookups += 1
        found = self._kept.get(key)
        if found is not None:
            self._used[key] = self._lookups
        return found

    def _keep(self, key: tuple, value, size: int) -> bool:
        """Keep `value` where there is room, or where copies unused for a round of lookups (about one decoding step:
        each copy is looked up once a step while its group lasts) make room."""
        self._drop(key)
        if size > self.max_bytes:
            return False
        while self._bytes + size > self.max_bytes:
            oldest = min(self._used, key=self._used.get)
            if self._used[oldest] > self._lookups - 2 * (len(self._kept) + 1):
                return False  # everything kept is in use: do not keep (nor copy) this one
            self._drop(oldest)
        self._kept[key], self._sizes[key], self._used[key] = value, size, self._lookups
        self._bytes += size
        return True

    def _drop(self, key: tuple) -> None:
        if key in self._kept:
            self._bytes -= self._sizes.pop(key)
            del self._kept[key], self._used[key]

    def clear(self) -> None:
        self._kept.clear()
        self._sizes.clear()
        self._used.clear()
        self._bytes = 0


class CrossGathers(_Kept):
    def __init__(self, max_bytes: int = MAX_BYTES):
        super().__init__(max_bytes)
        self._groups: tuple[tuple, object] | None = None  # (the rows' encoder tables and lengths, their groups)

    def groups(self, tables: list[list[int]], lengths: list[int], build: Callable[[], object]):
        """The rows' cross-attention length groups: built once while the batch stays the same (they depend on the
        tables and lengths only, which do not change while the rows run), not once per step."""
        key = (tuple(map(tuple, tables)), tuple(lengths))
        if self._groups is None or self._groups[0] != key:
            self._groups = (key, build())
        return self._groups[1]

    def get(self, layer: int, group, gather: Gather) -> tuple[torch.Tensor, torch.Tensor]:
        """group: a decode_attention.LengthGroup (its `key`: the rows' encoder tables and lengths)."""
        found = self._find((layer, group.key))
        if found is None:
            found = gather()
            self._keep((layer, group.key), found, found[0].nbytes + found[1].nbytes)
        return found


@dataclass
class _Grown:
    keys: torch.Tensor  # (Hkv, n, capacity, d): positions past a row's length hold zeros (read masked)
    values: torch.Tensor
    lengths: tuple[int, ...]  # each row's positions held


class SelfGathers(_Kept):
    def __init__(self, pool, max_bytes: int = MAX_BYTES, min_width: int = MIN_WIDTH):
        """pool: the kv_pool.KVPool whose new positions grow the kept copies."""
        super().__init__(max_bytes)
        self.pool = pool
        self.min_width = min_width
        self._positions: dict[tuple, torch.Tensor] = {}  # this step's, for all its layers (_new_positions)

    def get(self, layer: int, group, gather: Gather) -> tuple[torch.Tensor, torch.Tensor]:
        """group: a decode_attention.LengthGroup of a decoding step, with its rows' `serials`, `lengths` (this step's
        position included) and `fresh` (n,): the slot each row's position of this step was written to."""
        if group.fresh is None or group.width < self.min_width:
            return gather()
        serials, lengths, fresh = group.serials, group.lengths, group.fresh
        key = (layer, serials)
        kept = self._find(key)
        if kept is not None and kept.lengths == tuple(n - 1 for n in lengths) and group.width <= kept.keys.shape[2]:
            heads, rows, capacity, dim = kept.keys.shape
            at = self._new_positions(lengths, capacity, fresh.device)
            keys, values = self.pool.keys[layer], self.pool.values[layer]
            kept.keys.view(heads, rows * capacity, dim).index_copy_(1, at, keys.index_select(1, fresh))
            kept.values.view(heads, rows * capacity, dim).index_copy_(1, at, values.index_select(1, fresh))
            kept.lengths = lengths
        else:
            keys, values = gather()
            size = 2 * keys.nbytes * (keys.shape[2] + MARGIN) // max(keys.shape[2], 1)
            if not self._keep(key, None, size):  # room first: no copy made only to be dropped
                return keys, values
            kept = self._kept[key] = _grown(keys, values, lengths, group.distance)
        return kept.keys[:, :, :group.width], kept.values[:, :, :group.width]

    def _new_positions(self, lengths: tuple[int, ...], capacity: int, device: torch.device) -> torch.Tensor:
        """(n,) where this step's keys go in a kept copy (Hkv, n, capacity, d) seen as (Hkv, n · capacity, d); made
        once per step for all layers (a step's groups have their own lengths)."""
        key = (lengths, capacity)
        if key not in self._positions:
            if len(self._positions) >= 64:  # earlier steps'
                self._positions.clear()
            self._positions[key] = long_tensor(row * capacity + n - 1 for row, n in enumerate(lengths)).to(device)
        return self._positions[key]


def _grown(keys: torch.Tensor, values: torch.Tensor, lengths: tuple[int, ...], distance: torch.Tensor) -> _Grown:
    """A gathered group copied into zeroed room of MARGIN more positions, its padding zeroed too (only a row's own
    positions are kept)."""
    heads, rows, width, dim = keys.shape
    real = (distance >= 0)[None, :, :, None]  # (1, n, L, 1)
    room = keys.new_zeros(2, heads, rows, width + MARGIN, dim)
    room[0, :, :, :width] = keys * real
    room[1, :, :, :width] = values * real
    return _Grown(room[0], room[1], lengths)
