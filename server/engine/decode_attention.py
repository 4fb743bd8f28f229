"""A decoding step's attention: one query per row over that row's own keys in the KV pool.

A step of many short rows is launch-bound (a loop of three small kernels per row costs more than the model's
matmuls), so rows of about the same length go together:
    grouped  rows whose lengths differ by little (padding at most PADDING_TOLERANCE of what the group reads) are
             gathered into one (Hkv, n, L, d) tensor, the shorter ones padded with the scratch block and masked:
             gather, matmul, softmax, matmul for the whole group. Rows of equal length (a batch that started
             together) read no padding at all.
    per_row  a row alone, or rows whose keys are too large for a gather copy to pay (GATHER_MAX_ELEMENTS), three
             kernels over the row's runs, a view of the pool when they are one.
The same result either way (tests/server/test_decode_attention.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .int_tensors import long_tensor
from .kept_gathers import CrossGathers
from .kv_pool import SCRATCH_BLOCK, KVPool

PADDING_TOLERANCE = 0.05  # a group reads at most this share of padding positions
# a group's gathered keys, n · L · Hkv · d, at most this many elements: beyond, the gather's copy costs more than the
# launches it saves. On a CPU 1 << 17 was right while attention ran on one thread (16 rows of 60 positions, 8 heads
# of 64: grouped 0.76 ms, row by row 0.43 ms); on the OpenMP team the gather and the batched matmuls run in
# parallel, and 1 << 22 won in one process, interleaved (16 tasks × 16 rows, random T5 / demo: +3-4 % / ±2 % at 25
# input and 32 new tokens, +11 % / +11 % at 100 and 160; 1 << 24: +8 % on the random T5); on a GPU launches dominate
GATHER_MAX_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


@dataclass
class LengthGroup:
    """Rows decoded together: their key slots padded to the longest (scratch slots, masked). What a step reads of it
    is worked out when first read (a group whose keys are kept needs no slots: kept_gathers.py), once."""

    members: list[int]  # their places in the batch, in order
    lengths: tuple[int, ...]  # their key positions (a decoding step's own included)
    tables: list[list[int]]  # their block tables, as they are during the step that made the group
    block_size: int
    device: torch.device
    everyone: bool = False  # the group is the whole batch: its queries and outputs need no indexing
    serials: tuple = ()  # a decoding step's self-attention group: its rows' KV serials (kept_gathers.SelfGathers)
    fresh: torch.Tensor | None = None  # (n,) and the slot each row's position of this step was written to
    _terms: dict = field(default_factory=dict, repr=False)  # score terms by (T5 bias or not, dtype): one per step

    def score_term(self, bias, dtype: torch.dtype) -> torch.Tensor | None:
        """What its scores add in every layer of the step (_score_term), worked out once for all of them."""
        key = (bias is not None, dtype)
        if key not in self._terms:
            self._terms[key] = _score_term(self.distance, bias, self.padded, dtype) \
                if bias is not None or self.padded else None
        return self._terms[key]

    @cached_property
    def width(self) -> int:
        return max(self.lengths)

    @cached_property
    def padded(self) -> bool:
        """Some row is shorter than the width."""
        return min(self.lengths) < self.width

    @cached_property
    def rows(self) -> torch.Tensor:
        """(n,) the members on the device."""
        return long_tensor(self.members).to(self.device)

    @cached_property
    def distance(self) -> torch.Tensor:
        """(n, L) from each row's last position (its query) back to each key; < 0: padding."""
        return self._host_distance.to(self.device)

    @cached_property
    def slots(self) -> torch.Tensor:
        """(n, L) each row's key slots in order, then scratch."""
        blocks = self._blocks
        table = long_tensor(itertools.chain.from_iterable(
            itertools.islice(itertools.chain(own, itertools.repeat(SCRATCH_BLOCK)), blocks) for own in self.tables))
        slots = table.view(len(self.members), blocks, 1) * self.block_size + torch.arange(self.block_size)
        slots = slots.view(len(self.members), -1)[:, :self.width].contiguous()  # (n, B · S) -> (n, L)
        if self.padded:
            slots = slots.masked_fill(self._host_distance < 0, SCRATCH_BLOCK * self.block_size)
        return slots.to(self.device)

    @cached_property
    def key(self) -> tuple:
        """Its rows' tables and lengths (kept_gathers.CrossGathers)."""
        return tuple(tuple(own[:self._blocks]) for own in self.tables), self.lengths

    @cached_property
    def _host_distance(self) -> torch.Tensor:
        return long_tensor(self.lengths)[:, None] - 1 - torch.arange(self.width)[None, :]  # (n, L)

    @property
    def _blocks(self) -> int:
        return -(-self.width // self.block_size)


def length_groups(tables: list[list[int]], lengths: list[int], block_size: int, device: torch.device,
                  position_elements: int) -> tuple[list[LengthGroup], list[int]]:
    """Groups of two rows or more (longest first), and the rows left to go alone. position_elements: what one key
    position holds (Hkv · d), to keep each group's gather within GATHER_MAX_ELEMENTS of the device."""
    limit = GATHER_MAX_ELEMENTS.get(torch.device(device).type, GATHER_MAX_ELEMENTS["cuda"]) // position_elements
    order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
    groups: list[list[int]] = []
    alone: list[int] = []
    current: list[int] = []
    total = 0  # of the current group's lengths; its width is its first (longest) row's
    for row in order:
        if current and (1 - (total + lengths[row]) / (lengths[current[0]] * (len(current) + 1)) > PADDING_TOLERANCE
                        or lengths[current[0]] * (len(current) + 1) > limit):
            (groups.append(current) if len(current) > 1 else alone.extend(current))
            current, total = [], 0
        current.append(row)
        total += lengths[row]
    (groups.append(current) if len(current) > 1 else alone.extend(current))
    found = [_group(sorted(members), tables, lengths, block_size, device) for members in groups]
    if len(found) == 1 and not alone:
        found[0].everyone = True
    return found, alone


def _group(members: list[int], tables: list[list[int]], lengths: list[int], block_size: int,
           device: torch.device) -> LengthGroup:
    return LengthGroup(members, tuple(lengths[row] for row in members), [tables[row] for row in members],
                       block_size, device)


def attend(pool: KVPool, layer: int, query: torch.Tensor, step, cross: bool, bias) -> torch.Tensor:
    """query (N, Hq, d), already scaled -> (N, Hq, d). `step`: the forward's paged_attention.Step (its rows' length
    groups and runs, self- or cross-attention, and what is kept of earlier steps' gathers: kept_gathers.py); `bias`:
    T5's relative bias (by_distance / last_query) or None."""
    together, alone = step.groups(cross)
    kept = step.cross_gathers if cross else step.self_gathers
    if not together:
        return per_row(pool, layer, query, step.runs(cross), bias)  # every row, in batch order
    if together[0].everyone:
        return grouped(pool, layer, query, together[0], bias, kept)
    out = torch.empty_like(query)
    for group in together:
        out[group.rows] = grouped(pool, layer, query[group.rows], group, bias, kept)
    if alone:
        out[alone] = per_row(pool, layer, query[alone], step.runs(cross, alone), bias)
    return out


def grouped(pool: KVPool, layer: int, query: torch.Tensor, group: LengthGroup, bias,
            kept: CrossGathers | None = None) -> torch.Tensor:
    """query (n, Hq, d) -> (n, Hq, d) over the group's padded slots (gathered, or as `kept`)."""
    count, _, dim = query.shape

    def gather() -> tuple[torch.Tensor, torch.Tensor]:
        flat = group.slots.view(-1)
        heads_kv = pool.keys[layer].shape[0]
        return (pool.keys[layer].index_select(1, flat).view(heads_kv, count, group.width, dim),  # (Hkv, n, L, d)
                pool.values[layer].index_select(1, flat).view(heads_kv, count, group.width, dim))

    keys, values = kept.get(layer, group, gather) if kept is not None else gather()
    return _over_gathered(query, keys, values, group.score_term(bias, query.dtype))


def _score_term(distance: torch.Tensor, bias, masked: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """What scores over gathered keys add: T5's relative bias by distance and -inf over padding (where `masked`) ->
    (H or 1, n, 1, L), or None. distance (n, L) from each row's query back to each key, < 0 for padding."""
    term = None
    if bias is not None:  # T5: (H, D) by distance -> (H, n, 1, L); its heads are not grouped (g = 1)
        term = bias.by_distance(distance.shape[1])[:, distance.clamp(min=0)][:, :, None, :].to(dtype)
    if masked:
        padding = (distance < 0)[None, :, None, :]  # (1, n, 1, L)
        if term is None:
            term = torch.zeros(padding.shape, dtype=dtype, device=distance.device)
        term = term.masked_fill(padding, float("-inf"))
    return term


def _over_gathered(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, term: torch.Tensor | None
                   ) -> torch.Tensor:
    """Attention of each row's query over its gathered keys: query (n, Hq, d); keys, values (Hkv, n, L, d); term
    what the scores add (_score_term) -> (n, Hq, d)."""
    count, heads_q, dim = query.shape
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    grouped_q = query.view(count, keys.shape[0], -1, dim).transpose(0, 1)  # (Hkv, n, g, d)
    scores = torch.matmul(grouped_q, keys.transpose(-1, -2))  # (Hkv, n, g, L)
    if term is not None:
        scores.add_(term)  # in place: scores is this function's own
    weights = _softmax(scores).to(values.dtype)
    return torch.matmul(weights, values).transpose(0, 1).reshape(count, heads_q, dim)  # (n, Hq, d)


def per_row(pool: KVPool, layer: int, query: torch.Tensor, runs: list[list[tuple[int, int]]], bias) -> torch.Tensor:
    count, heads_q, dim = query.shape
    outs = []
    for row, row_runs in enumerate(runs):
        keys, values = pool.read(layer, row_runs)  # (Hkv, L, d)
        if keys.dtype != query.dtype:
            keys, values = keys.to(query.dtype), values.to(query.dtype)
        grouped = query[row].view(keys.shape[0], -1, dim)  # (Hkv, g, d)
        if bias is None:
            scores = torch.bmm(grouped, keys.transpose(1, 2))  # (Hkv, g, L)
        else:  # T5: no grouped heads, its bias (H, 1, L) added to the scores
            scores = torch.baddbmm(bias.last_query(keys.shape[1], query.dtype), grouped, keys.transpose(1, 2))
        weights = _softmax(scores).to(values.dtype)
        outs.append(torch.bmm(weights, values))  # (Hkv, g, d)
    return torch.stack(outs).view(count, heads_q, dim)


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Over the last axis, in float32 (asking float32 of a float32 tensor costs a slower kernel)."""
    if scores.dtype == torch.float32:
        return torch.softmax(scores, dim=-1)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def static_tables(pool: KVPool, layer: int, query: torch.Tensor, tables: torch.Tensor, lengths: torch.Tensor,
                  bias) -> torch.Tensor:
    """The static-shaped step's attention (static_step.py): query (B, Hq, d), already scaled; tables (B, W) block
    tables padded with scratch; lengths (B,) -> (B, Hq, d). Every row reads W·S positions, those past its length
    masked: shapes depend on (B, W) only and nothing is read back to the host, so the step can be captured. The
    pool must hold finite values in every block (KVPool(zeroed=True)): masked positions weigh 0, and 0 · NaN is not
    0."""
    count, _, dim = query.shape
    width = tables.shape[1] * pool.block_size
    heads_kv = pool.keys[layer].shape[0]
    flat = tables.reshape(-1)
    keys = pool.keys[layer].view(heads_kv, -1, pool.block_size, dim).index_select(1, flat)  # (Hkv, B·W, S, d)
    values = pool.values[layer].view(heads_kv, -1, pool.block_size, dim).index_select(1, flat)
    distance = lengths[:, None] - 1 - torch.arange(width, device=lengths.device)[None, :]  # (B, L)
    return _over_gathered(query, keys.view(heads_kv, count, width, dim), values.view(heads_kv, count, width, dim),
                          _score_term(distance, bias, True, query.dtype))
