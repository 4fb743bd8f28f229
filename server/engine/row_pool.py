"""Per-row adapter stacks that persist from batch to batch, so a mixed batch copies only adapters that are new.

The rows mode of the wrapped layers needs, per layer, A (N, d_in, r) and B (N, r, d_out) with row i's adapter
at position i. Building those stacks costs a copy of N whole adapters per batch (memory-bound: ~70 MB for 16
rows of a t5-small-sized inventory). The pool keeps them between batches instead and remembers which adapter
(by cache key) sits at each position; the engine then runs each row at a position that already holds its
adapter when it can (rows may run in any order), and copies only into the others.

    pool (per module group):  A (L, S, d_in, r),  B (L, S, r, d_out)    S = the largest batch seen so far
    layer i of the group, batch of n:  A[i, :n] (n, d_in, r), B[i, :n]  -- contiguous views, no copy
The pool holds S whole adapters for good, so S is capped (max_rows); a larger batch gets stacks of its own.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from adapter_store import TaskAdapter


def assign_positions(resident: Sequence[Hashable | None], keys: Sequence[Hashable | None]) -> list[int]:
    """order[p] = the row that runs at position p of the batch. A row keeps a position whose resident adapter
    has its key (each resident copy serves one row); the other rows fill the remaining positions in order.
    A key of None never matches (e.g. an adapter still being trained)."""
    n = len(keys)
    holders: dict[Hashable, list[int]] = {}
    for position, key in enumerate(resident[:n]):
        if key is not None:
            holders.setdefault(key, []).append(position)
    order, pending = [-1] * n, []
    for row, key in enumerate(keys):
        spots = holders.get(key) if key is not None else None
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
        self.max_rows = max_rows  # larger batches (e.g. /score: rows x choices) get throw-away stacks instead
        self._a: list[torch.Tensor] = []  # per module group: (L, S, d_in, r)
        self._b: list[torch.Tensor] = []  # per module group: (L, S, r, d_out)
        self._resident: list[Hashable | None] = []  # cache key of the adapter at each position
        self._current: list[tuple[torch.Tensor, torch.Tensor]] = []  # the batch's stacks, per group
        self.copies = 0  # adapters copied into the pool so far (a measure of reuse)

    def place(self, row_adapters: Sequence[TaskAdapter], keys: Sequence[Hashable | None]) -> list[int]:
        """Put each row's adapter at its position (copying only where needed); return the order (see above)."""
        n = len(row_adapters)
        if n > self.max_rows:
            self._current = [_stacked(row_adapters, g) for g in range(len(row_adapters[0].groups))]
            return list(range(n))
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, written in and out of inference
            self._fit(row_adapters[0], n)
            order = assign_positions(self._resident, keys)
            for position, row in enumerate(order):
                if keys[row] is None or self._resident[position] != keys[row]:
                    self._copy_in(position, row_adapters[row])
                    self._resident[position] = keys[row]
        self._current = [(a[:, :n], b[:, :n]) for a, b in zip(self._a, self._b, strict=True)]
        return order

    def rows(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The placed batch's stacks of a group: A (L, n, d_in, r), B (L, n, r, d_out)."""
        return self._current[group]

    def release(self) -> None:
        """Drop the batch's views (the pool itself stays)."""
        self._current = []

    def _fit(self, adapter: TaskAdapter, n: int) -> None:
        """(Re)allocate when the layout, dtype or device changed or the batch is larger than the pool."""
        fits = len(self._a) == len(adapter.groups) and all(
            pool_a.shape[1] >= n and _same_layout(pool_a, g.lora_a) and _same_layout(pool_b, g.lora_b)
            for pool_a, pool_b, g in zip(self._a, self._b, adapter.groups, strict=True)
        )
        if fits:
            return
        size = max(n, len(self._resident))
        self._a = [_pool(g.lora_a, size) for g in adapter.groups]
        self._b = [_pool(g.lora_b, size) for g in adapter.groups]
        self._resident = [None] * size

    def _copy_in(self, position: int, adapter: TaskAdapter) -> None:
        for pool_a, pool_b, group in zip(self._a, self._b, adapter.groups, strict=True):
            pool_a[:, position].copy_(group.lora_a)
            pool_b[:, position].copy_(group.lora_b)
        self.copies += 1


def _stacked(row_adapters: Sequence[TaskAdapter], group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's own stacks in row order, one copy: (L, d_in, r) x n -> (L, n, d_in, r); same for B."""
    return (torch.stack([a.groups[group].lora_a for a in row_adapters], dim=1),
            torch.stack([a.groups[group].lora_b for a in row_adapters], dim=1))


def _pool(stacked: torch.Tensor, size: int) -> torch.Tensor:
    """(L, x, y) per-layer tensors -> an empty pool (L, size, x, y) of the same dtype and device."""
    layers, *matrix = stacked.shape
    return torch.empty(layers, size, *matrix, dtype=stacked.dtype, device=stacked.device)


def _same_layout(pool: torch.Tensor, stacked: torch.Tensor) -> bool:
    return (pool.shape[0], *pool.shape[2:]) == tuple(stacked.shape) and pool.dtype == stacked.dtype \
        and pool.device == stacked.device
