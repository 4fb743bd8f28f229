"""The decoding step's attention (server/engine/decode_attention.py) against plain softmax attention over each row's
own keys, written here: rows grouped by length and rows alone give the same, padding is never read into a row, and
the grouping keeps padding within its tolerance."""

from __future__ import annotations

import pytest
import torch

from server.engine import decode_attention, paged_attention
from server.engine.kv_pool import KVPool, runs

BLOCK = 4


class _Step:
    """What attend reads of a paged_attention.Step: the rows' runs and length groups (nothing kept of earlier steps'
    gathers: kept_gathers.py)."""

    self_gathers = cross_gathers = None

    def __init__(self, tables, lengths, grouped: bool = True):
        self.tables, self.lengths, self.grouped = tables, lengths, grouped

    def runs(self, cross, rows=None):
        return [runs(self.tables[row], self.lengths[row], BLOCK)
                for row in (range(len(self.tables)) if rows is None else rows)]

    def groups(self, cross):
        # not grouped: positions too large for any gather, so every row goes alone (in length_groups' own order)
        position_elements = 1 if self.grouped else 1 << 40
        return decode_attention.length_groups(self.tables, self.lengths, BLOCK, torch.device("cpu"),
                                              position_elements)


class _Bias:
    """A T5-like relative bias: a table by distance."""

    def __init__(self, heads: int):
        self.table = torch.randn(heads, 64)

    def by_distance(self, length):
        return self.table[:, :length]

    def last_query(self, keys, dtype):
        return self.table[:, :keys].flip(-1)[:, None, :].to(dtype)


def _pool(heads_kv: int, dim: int, blocks: int) -> KVPool:
    torch.manual_seed(0)
    pool = KVPool(1, heads_kv, dim, blocks, BLOCK, torch.float32, torch.device("cpu"))
    pool.keys[0][:, BLOCK:].normal_()
    pool.values[0][:, BLOCK:].normal_()
    pool.keys[0][:, :BLOCK] = float("nan")  # scratch holds garbage: padding must never reach a row's output
    pool.values[0][:, :BLOCK] = float("nan")
    return pool


def _reference(pool, query, tables, lengths, bias=None):
    outs = []
    for row, (table, length) in enumerate(zip(tables, lengths, strict=True)):
        slots = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(length)]
        keys, values = pool.keys[0][:, slots], pool.values[0][:, slots]  # (Hkv, L, d)
        q = query[row].view(keys.shape[0], -1, keys.shape[2])  # (Hkv, g, d)
        scores = q @ keys.transpose(1, 2)  # (Hkv, g, L)
        if bias is not None:
            scores = scores + bias.by_distance(length).flip(-1)[:, None, :]
        outs.append((scores.softmax(-1) @ values).reshape(-1, keys.shape[2]))
    return torch.stack(outs)


def _scratch_nan_free(pool):
    pool.keys[0][:, :BLOCK] = 0  # attend's grouped path reads scratch masked: it must be finite (KVPool zeroes it)
    pool.values[0][:, :BLOCK] = 0


@pytest.mark.parametrize("heads_q,heads_kv", [(4, 2), (4, 4)])
@pytest.mark.parametrize("lengths", [[9, 9, 9], [12, 11, 12, 3, 1], [5], [16, 15, 2, 2]])
def test_grouped_and_alone_equal_plain_attention(heads_q, heads_kv, lengths):
    dim = 8
    pool = _pool(heads_kv, dim, 40)
    tables = [[1 + 5 * row + b for b in (0, 2, 1, 3)][: -(-n // BLOCK)]  # blocks out of order
              for row, n in enumerate(lengths)]
    query = torch.randn(len(lengths), heads_q, dim)
    expected = _reference(pool, query, tables, lengths)
    alone = decode_attention.attend(pool, 0, query, _Step(tables, lengths, grouped=False), False, None)
    torch.testing.assert_close(alone, expected)
    _scratch_nan_free(pool)
    together = decode_attention.attend(pool, 0, query, _Step(tables, lengths), False, None)
    torch.testing.assert_close(together, expected)


def test_t5_bias_by_distance_in_groups():
    lengths = [7, 7, 6]
    pool = _pool(3, 8, 20)
    _scratch_nan_free(pool)
    tables = [[1 + 2 * row, 2 + 2 * row] for row in range(3)]
    query, bias = torch.randn(3, 3, 8), _Bias(3)
    expected = _reference(pool, query, tables, lengths, bias)
    for grouped in (True, False):
        out = decode_attention.attend(pool, 0, query, _Step(tables, lengths, grouped), False, bias)
        torch.testing.assert_close(out, expected)


def test_groups_keep_padding_within_tolerance():
    lengths = [100, 99, 97, 60, 59, 10, 3]
    tables = [list(range(1, 27)) for _ in lengths]
    groups, alone = decode_attention.length_groups(tables, lengths, BLOCK, torch.device("cpu"), 1)
    members = [g.rows.tolist() for g in groups]
    assert members == [[0, 1, 2], [3, 4]]
    assert sorted(alone) == [5, 6]
    for group in groups:
        real = sum(lengths[r] for r in group.rows.tolist())
        assert 1 - real / (group.width * len(group.rows)) <= decode_attention.PADDING_TOLERANCE
        assert not group.padded or (group.slots[group.distance < 0] == 0).all()  # padding reads scratch only


def test_groups_stay_within_the_gather_limit():
    """On a CPU a group's gathered keys stay within the limit (n · L · Hkv · d): small heads' rows all together,
    large heads' rows in smaller groups, and a row whose keys alone exceed it alone."""
    lengths = [100] * 16
    tables = [list(range(1, 27)) for _ in lengths]
    limit = decode_attention.GATHER_MAX_ELEMENTS["cpu"]
    for per_position, most in ((2 * 16, 16), (32 * 128, limit // (32 * 128 * 100)), (limit // 100, 1)):
        assert 1 <= most <= 16
        groups, alone = decode_attention.length_groups(tables, lengths, BLOCK, torch.device("cpu"), per_position)
        assert max([len(g.rows) for g in groups] or [1]) == most
        assert sum(len(g.rows) for g in groups) + len(alone) == 16
        assert all(g.width * len(g.rows) * per_position <= limit for g in groups)


def test_prefill_masks_are_built_on_the_querys_device():
    """A prefill's causal mask and T5's bias for several queries are made on the query's device (an H200 run found
    both on the host, failing every Llama prompt and T5 chunk there); the meta device stands in for a GPU."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    meta = torch.device("meta")
    mask = paged_attention._mask(None, 3, 8, torch.float32, meta, causal=True)
    assert mask.device == meta and mask.shape == (1, 3, 8)
    config = T5Config(d_model=16, d_kv=4, num_heads=2, is_decoder=True)
    attention = T5Attention(config, has_relative_attention_bias=True).to(meta)
    bias = paged_attention._T5Bias(attention).for_rows(3, 8, torch.float32)
    assert bias.device == meta and bias.shape == (2, 3, 8)

