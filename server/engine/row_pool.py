"""Per-row adapter stacks that persist between decoding steps, so the running batch copies only adapters
that are new at their position.

The rows mode of the wrapped layers needs, per layer, Aᵀ (N, r, d_in) and B (N, r, d_out) with row i's adapter at
position i (A transposed: a decoding step's x·A per row is then a product with contiguous rows of Aᵀ, 4-6x faster on
a CPU than over A's columns). Building those stacks costs a copy of N whole adapters (memory-bound: ~70 MB for 16
rows of a t5-small-sized inventory); the pool keeps them instead and remembers which adapter (by cache key) sits at
each position. The scheduler decides where rows run (`assign_positions` helps it put a row where its adapter already
is); `sync` then copies only into positions whose resident key differs.

    pool (per module group):  Aᵀ (L, S, r, d_in),  B (L, S, r, d_out)    S = the most rows seen so far (≤ max_rows)
    layer i of the group, rows [start, end):  Aᵀ[i, start:end], B[i, start:end]  -- contiguous views, no copy
Forwards that are not the running batch (scoring, beam search, training) use their own stacks (`stacked`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from adapter_store import TaskAdapter


def assign_positions(resident: Sequence[Hashable | None], keys: Sequence[Hashable]) -> list[int]:
    """order[p] = the row (index into keys) to run at position p of len(keys) positions. A row takes a position
    whose resident adapter has its key (each resident copy serves one row); the others fill the rest in order."""
    n = len(keys)
    holders: dict[Hashable, list[int]] = {}
    for position, key in enumerate(resident[:n]):
        if key is not None:
            holders.setdefault(key, []).append(position)
    order, pending = [-1] * n, []
    for row, key in enumerate(keys):
        spots = holders.get(key)
        if spots:
            order[spots.pop()] = row
        else:
            pending.append(row)
    free = iter(p for p in range(n) if order[p] < 0)
    for row in pending:
        order[next(free)] = row
    return order


class RowPool:
    def __init__(self, max_rows: int = 64) -> None:
        self.max_rows = max_rows
        self._a: list[torch.Tensor] = []  # per module group: Aᵀ (L, S, r, d_in)
        self._b: list[torch.Tensor] = []  # per module group: (L, S, r, d_out)
        self.resident: list[Hashable | None] = []  # cache key of the adapter at each position
        self.copies = 0  # adapters copied into the pool so far (a measure of reuse)

    def sync(self, adapters: Sequence[TaskAdapter], keys: Sequence[Hashable], positions: int | None = None) -> None:
        """Make position p hold adapters[p] (named keys[p]) for every p < len(adapters), copying only where the
        resident key differs; the pool has at least `positions` positions (default: the adapters')."""
        n = max(len(adapters), positions or 0)
        if n > self.max_rows:
            raise ValueError(f"{n} rows do not fit a row pool of {self.max_rows}")
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, written in and out of inference
            self._fit(adapters[0], n)
            for position, (adapter, key) in enumerate(zip(adapters, keys, strict=True)):
                if self.resident[position] != key:
                    self._copy_in(position, adapter)
                    self.resident[position] = key

    def rows(self, group: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of positions [start, end) of a group: Aᵀ (L, n, r, d_in), B (L, n, r, d_out)."""
        return self._a[group][:, start:end], self._b[group][:, start:end]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self._a, *self._b))

    def _fit(self, adapter: TaskAdapter, n: int) -> None:
        """(Re)allocate when the layout, dtype or device changed or more rows are needed than the pool has."""
        fits = len(self._a) == len(adapter.groups) and all(
            pool_a.shape[1] >= n and _same_layout(pool_a, g.lora_a.transpose(1, 2)) and _same_layout(pool_b, g.lora_b)
            for pool_a, pool_b, g in zip(self._a, self._b, adapter.groups, strict=True)
        )
        if fits:
            return
        size = min(max(n, len(self.resident)), self.max_rows)
        self._a, self._b = [], []  # free the old pool before allocating the new one
        self._a = [_pool(g.lora_a.transpose(1, 2), size) for g in adapter.groups]
        self._b = [_pool(g.lora_b, size) for g in adapter.groups]
        self.resident = [None] * size

    def _copy_in(self, position: int, adapter: TaskAdapter) -> None:
        for pool_a, pool_b, group in zip(self._a, self._b, adapter.groups, strict=True):
            pool_a[:, position].copy_(group.lora_a.transpose(1, 2))
            pool_b[:, position].copy_(group.lora_b)
        self.copies += 1


def stacked(row_adapters: Sequence[TaskAdapter], group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's own stacks in row order, one copy: A (L, d_in, r) x n -> Aᵀ (L, n, r, d_in); B (L, n, r, d_out)."""
    return (torch.stack([a.groups[group].lora_a.transpose(1, 2) for a in row_adapters], dim=1),
            torch.stack([a.groups[group].lora_b for a in row_adapters], dim=1))


def _pool(stacked_layers: torch.Tensor, size: int) -> torch.Tensor:
    """(L, x, y) per-layer tensors -> a pool (L, size, x, y) of zeros, same dtype and device (a position no row
    has used yet may run as a padding row: finite)."""
    layers, *matrix = stacked_layers.shape
    return torch.zeros(layers, size, *matrix, dtype=stacked_layers.dtype, device=stacked_layers.device)


def _same_layout(pool: torch.Tensor, layers: torch.Tensor) -> bool:
    return (pool.shape[0], *pool.shape[2:]) == tuple(layers.shape) and pool.dtype == layers.dtype \
        and pool.device == layers.device
