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
    """Rows decoded together: their key slots padded to the longest (scratch slots, masked)."""

    rows: torch.Tensor  # (n,) their places in the batch, in order
    slots: torch.Tensor  # (n, L) each row's key slots, then scratch
    distance: torch.Tensor  # (n, L) from the row's last position (its query) back to each key; < 0: padding
    padded: bool  # some row is shorter than L
    key: tuple = ()  # its rows' tables and lengths (kept_gathers.CrossGathers)
    everyone: bool = False  # the group is the whole batch: its queries and outputs need no indexing
    serials: tuple = ()  # a decoding step's self-attention group: its rows' KV serials (kept_gathers.SelfGathers),
    lengths: tuple = ()  # their lengths (this step's position included)
    fresh: torch.Tensor | None = None  # (n,) and the slot each row's position of this step was written to
    _terms: dict = field(default_factory=dict, repr=False)  # score terms by (T5 bias or not, dtype): one per step

    def score_term(self, bias, dtype: torch.dtype) -> torch.Tensor | None:
        """What its scores add in every layer of the step (_score_term), worked out once for all of them."""
        key = (bias is not None, dtype)
        if key not in self._terms:
            self._terms[key] = _score_term(self.distance, bias, self.padded, dtype)
        return self._terms[key]

    @property
    def width(self) -> int:
        return self.slots.shape[1]


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
    row_lengths = [lengths[row] for row in members]
    width = max(row_lengths)
    blocks = -(-width // block_size)
    table = long_tensor(itertools.chain.from_iterable(
        itertools.islice(itertools.chain(tables[row], itertools.repeat(SCRATCH_BLOCK)), blocks) for row in members))
    slots = table.view(len(members), blocks, 1) * block_size + torch.arange(block_size)  # (n, B, S)
    slots = slots.view(len(members), -1)[:, :width].contiguous()  # (n, L): each row's key slots in order
    distance = long_tensor(row_lengths)[:, None] - 1 - torch.arange(width)[None, :]  # (n, L)
    padded = min(row_lengths) < width
    if padded:
        slots = slots.masked_fill(distance < 0, SCRATCH_BLOCK * block_size)
    key = (tuple(tuple(tables[row][:blocks]) for row in members), tuple(row_lengths))
    return LengthGroup(long_tensor(members).to(device), slots.to(device), distance.to(device), padded, key)


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

    keys, values = kept.get(pool, layer, group, gather) if kept is not None else gather()
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
