"""The KV block manager without a model: consecutive allocation, sharing and release, the prefix cache (hits only
under the same adapter key, LRU eviction), and the pool's runs."""

import pytest
import torch

from server.engine.block_manager import BlockManager, prefix_hash
from server.engine.kv_pool import KVPool, runs, slots_of


def test_a_rows_blocks_are_consecutive_and_new_rows_leave_room_between_them():
    blocks = BlockManager(64, 16)
    first = blocks.allocate(3)
    assert first == [first[0], first[0] + 1, first[0] + 2]
    second = blocks.allocate(2)
    assert abs(second[0] - first[-1]) > 2  # placed in the middle of the free space, not right after `first`
    grown = blocks.allocate(1, after=first[-1])
    assert grown == [first[-1] + 1]
    assert blocks.used == 6 and blocks.free == 64 - 1 - 6


def test_allocation_refuses_what_it_cannot_give_and_never_hands_out_scratch():
    blocks = BlockManager(5, 16)
    got = blocks.allocate(4)
    assert 0 not in got and blocks.allocate(1) is None
    blocks.release(got[:2])
    assert blocks.free == 2 and sorted(blocks.allocate(2)) == sorted(got[:2])


def test_shared_blocks_are_freed_by_their_last_holder():
    blocks = BlockManager(8, 16)
    held = blocks.allocate(2)
    blocks.share(held)
    blocks.release(held)
    assert blocks.used == 2
    blocks.release(held)
    assert blocks.used == 0 and blocks.free == 7


def test_prefix_blocks_are_found_only_under_the_same_adapter_and_leading_tokens():
    blocks = BlockManager(16, 4)
    tokens = list(range(12))
    chain = [prefix_hash(None, "task-a@v1", tokens[:4])]
    chain.append(prefix_hash(chain[0], "task-a@v1", tokens[4:8]))
    held = blocks.allocate(2)
    for block, digest in zip(held, chain, strict=True):
        blocks.register(block, digest)
    blocks.release(held)
    assert blocks.cached == 2 and blocks.used == 0
    assert blocks.cached_prefix([prefix_hash(None, "task-a@v2", tokens[:4])]) == []  # another version: no hit
    assert blocks.cached_prefix([chain[0], prefix_hash(chain[0], "task-a@v1", [9, 9, 9, 9])]) == held[:1]
    assert blocks.cached == 1 and blocks.used == 1 and blocks.prefix_hits == 1


def test_cached_blocks_are_evicted_least_recently_used_first_when_blocks_run_out():
    blocks = BlockManager(4, 4)  # 3 usable
    old, new = blocks.allocate(1), blocks.allocate(1)
    blocks.register(old[0], 1)
    blocks.register(new[0], 2)
    blocks.release(old)
    blocks.release(new)
    assert blocks.available() == 3
    blocks.allocate(2)  # one free block, then the oldest cached one
    assert blocks.cached_prefix([1]) == [] and blocks.cached_prefix([2]) == new


def test_the_prefix_cache_can_be_off():
    blocks = BlockManager(8, 4, prefix_cache=False)
    held = blocks.allocate(1)
    blocks.register(held[0], 7)
    blocks.release(held)
    assert blocks.cached == 0 and blocks.cached_prefix([7]) == []


@pytest.mark.parametrize(("table", "length", "expected"), [
    ([3, 4, 5], 40, [(48, 88)]),  # consecutive blocks: one run, cut at the length
    ([3, 7, 8], 33, [(48, 64), (112, 129)]),
    ([2], 16, [(32, 48)]),
])
def test_runs_merge_consecutive_blocks(table, length, expected):
    assert runs(table, length, 16) == expected


def test_the_pool_reads_a_rows_runs_as_written():
    pool = KVPool(layers=2, kv_heads=2, head_dim=4, blocks=6, block_size=4, dtype=torch.float32,
                  device=torch.device("cpu"))
    table = [2, 5]
    keys = torch.randn(1, 2, 6, 4)  # (N, heads, positions, d)
    slots = torch.tensor([slots_of(table, range(6), 4)])
    pool.write(1, slots, keys, -keys)
    read_keys, read_values = pool.read(1, runs(table, 6, 4))
    assert torch.equal(read_keys, keys[0]) and torch.equal(read_values, -keys[0])
    pool.copy_block(5, 3)
    assert torch.equal(pool.read(1, [(12, 14)])[0], keys[0, :, 4:6])
