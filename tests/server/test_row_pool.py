"""The row pool: which row runs where, what is copied, and that reused positions hold the right adapter."""

import pytest
import torch

from adapter_store import LayerGroup, TaskAdapter
from server.engine.row_pool import RowPool, assign_positions, stacked


def adapter(value: float, layers: int = 2, d_in: int = 4, rank: int = 2, d_out: int = 3) -> TaskAdapter:
    group = LayerGroup(("m0", "m1")[:layers], torch.full((layers, d_in, rank), value),
                       torch.full((layers, rank, d_out), -value))
    return TaskAdapter(rank, 1.0 / rank, (group,))


@pytest.mark.parametrize(("resident", "keys", "expected"), [
    ([], ["a", "b"], [0, 1]),                          # empty pool: input order
    (["a", "b"], ["b", "a"], [1, 0]),                  # both resident, swapped: rows follow their adapters
    (["a", "b", "c"], ["c", "x", "a"], [2, 1, 0]),     # x takes the free position (b's)
    (["a", "a"], ["a", "a"], [1, 0]),                  # duplicates: one resident copy per row
    (["a", None], ["a", "a"], [0, 1]),                 # a second row of a needs a copy of its own
    (["a", "b", "c"], ["c"], [0]),                     # resident beyond the batch size is out of reach
])
def test_assign_positions(resident, keys, expected):
    order = assign_positions(resident, keys)
    assert order == expected and sorted(order) == list(range(len(keys)))


def test_sync_copies_only_adapters_new_at_their_position_and_every_position_holds_its_adapter():
    pool, adapters = RowPool(), {k: adapter(float(v)) for v, k in enumerate("abcde", start=1)}

    def sync(keys):
        pool.sync([adapters[k] for k in keys], keys)
        a, b = pool.rows(0, 0, len(keys))  # Aᵀ (L, n, r, d_in), B (L, n, r, d_out)
        for position, key in enumerate(keys):
            assert torch.equal(a[:, position], adapters[key].groups[0].lora_a.transpose(1, 2))
            assert torch.equal(b[:, position], adapters[key].groups[0].lora_b)

    sync(["a", "b", "c"])
    assert pool.copies == 3
    sync(["a", "b", "c"])
    assert pool.copies == 3  # all three already in place
    sync(["a", "d", "c"])
    assert pool.copies == 4  # only d
    sync(["a", "d"])
    assert pool.copies == 4  # fewer rows: nothing to copy
    sync(["e", "d", "c", "a", "b"])  # a larger batch: the pool grows, so everything is copied again
    assert pool.copies == 9
    sync(["c", "c"])
    assert pool.copies == 11  # two rows of c, each position needs its own copy
    assert pool.resident[:2] == ["c", "c"]


def test_rows_are_views_of_a_range_of_positions():
    pool, adapters = RowPool(), [adapter(float(v)) for v in range(1, 4)]
    pool.sync(adapters, ["a", "b", "c"])
    a, _ = pool.rows(0, 1, 3)
    assert a.shape[1] == 2 and torch.equal(a[:, 0], adapters[1].groups[0].lora_a.transpose(1, 2))
    a[:, 0].zero_()  # a view: writes land in the pool
    assert torch.equal(pool.rows(0, 1, 2)[0][:, 0], torch.zeros_like(adapters[1].groups[0].lora_a.transpose(1, 2)))


def test_pool_follows_a_change_of_dtype():
    pool = RowPool()
    pool.sync([adapter(1.0), adapter(2.0)], ["a", "b"])
    half = [a.to("cpu", torch.bfloat16) for a in (adapter(1.0), adapter(2.0))]
    pool.sync(half, ["a16", "b16"])
    assert pool.rows(0, 0, 2)[0].dtype == torch.bfloat16


def test_more_rows_than_the_cap_is_an_error_and_stacked_builds_own_stacks():
    pool, adapters = RowPool(max_rows=2), [adapter(float(v)) for v in range(1, 4)]
    with pytest.raises(ValueError, match="do not fit"):
        pool.sync(adapters, ["a", "b", "c"])
    a, b = stacked(adapters, 0)
    assert a.shape[1] == 3 and all(torch.equal(a[:, i], adapters[i].groups[0].lora_a.transpose(1, 2)) for i in range(3))
