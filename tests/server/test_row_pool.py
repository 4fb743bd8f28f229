"""The row pool: which row runs where, what is copied, and that reused positions hold the right adapter."""

import pytest
import torch

from adapter_store import LayerGroup, TaskAdapter
from server.engine.row_pool import RowPool, assign_positions


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
    (["a", "b"], [None, "a"], [1, 0]),                 # None never matches, even a None position
    (["a", "b", "c"], ["c"], [0]),                     # resident beyond the batch size is out of reach
])
def test_assign_positions(resident, keys, expected):
    order = assign_positions(resident, keys)
    assert order == expected and sorted(order) == list(range(len(keys)))


def test_pool_copies_only_new_adapters_and_every_position_holds_its_rows_adapter():
    pool, adapters = RowPool(), {k: adapter(float(v)) for v, k in enumerate("abcde", start=1)}

    def place(keys):
        order = pool.place([adapters[k] for k in keys], keys)
        a, b = pool.rows(0)  # (L, n, d_in, r), (L, n, r, d_out)
        for position, row in enumerate(order):
            assert torch.equal(a[:, position], adapters[keys[row]].groups[0].lora_a)
            assert torch.equal(b[:, position], adapters[keys[row]].groups[0].lora_b)
        return order

    place(["a", "b", "c"])
    assert pool.copies == 3
    place(["c", "a", "b"])
    assert pool.copies == 3  # all three already resident
    place(["c", "d", "a"])
    assert pool.copies == 4  # only d
    place(["e", "c", "d", "a", "b"])  # a larger batch: the pool grows, so everything is copied again
    assert pool.copies == 9
    place(["c", "c"])
    assert pool.copies == 10  # one c is resident (position 1), the second row needs a copy
    place(["a", "b"])
    assert pool.copies == 12  # a and b sit at positions 3 and 4, out of reach of a batch of 2


def test_unkeyed_adapters_are_always_copied():
    pool, trained = RowPool(), adapter(1.0)
    pool.place([trained, adapter(2.0)], [None, "b"])
    trained.groups[0].lora_a.add_(1.0)  # e.g. an adapter being trained, changed in place
    order = pool.place([trained, adapter(2.0)], [None, "b"])
    a, _ = pool.rows(0)
    assert torch.equal(a[:, order.index(0)], trained.groups[0].lora_a)


def test_pool_follows_a_change_of_dtype():
    pool = RowPool()
    pool.place([adapter(1.0), adapter(2.0)], ["a", "b"])
    half = [a.to("cpu", torch.bfloat16) for a in (adapter(1.0), adapter(2.0))]
    pool.place(half, ["a16", "b16"])
    assert pool.rows(0)[0].dtype == torch.bfloat16


def test_a_batch_larger_than_the_cap_gets_its_own_stacks_and_leaves_the_pool_alone():
    pool, adapters = RowPool(max_rows=2), [adapter(float(v)) for v in range(1, 4)]
    pool.place(adapters[:2], ["a", "b"])
    order = pool.place(adapters, ["a", "b", "c"])
    a, b = pool.rows(0)
    assert order == [0, 1, 2] and a.shape[1] == 3 and pool.copies == 2
    assert all(torch.equal(a[:, i], adapters[i].groups[0].lora_a) for i in range(3))
    pool.place(adapters[:2][::-1], ["b", "a"])
    assert pool.copies == 2  # the pool still holds a and b
