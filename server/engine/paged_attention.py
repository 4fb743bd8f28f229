"""Attention over the KV pool (kv_pool.py), plugged into transformers' own model code: the model runs unchanged,
its cache writes go to the pool and its attention reads each row's own positions only.

    install(model)        registers the attention implementation "mhr_paged" (and its mask function, sdpa's) and
                          sets it on the decoder's config; outside a paged forward it is the model's usual attention
                          (scoring, training and T5's encoder are untouched)
    with paged(step):     a forward of the serving loop: `step` (a Step) says, per row, where its new keys and
                          values go (slots) and which slot runs hold its keys (self-attention, and for T5 the
                          cross-attention over the row's own encoder output)
A prefill is one SDPA call per row over its runs (a view when they are one run); a decoding step is
decode_attention.py's (rows of about the same length at once). No row reads another row's padding
(a decoding group of rows of near lengths reads at most 5 % padding).
Rows' queries are left-padded (the last `queries[b]` positions of the batch's query axis are real); a
row's query i sits at position L - q + i of its L keys and sees keys up to it. T5's decoder adds its relative
position bias per row (from the first layer's bias table, by distance) and does not scale the scores.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import decode_attention
from .decode_attention import LengthGroup
from .kept_gathers import CrossGathers, SelfGathers
from .kv_pool import KVPool, runs

NAME = "mhr_paged"
STATIC_KWARG = "mhr_static"  # a static-shaped step's inputs, passed down the model's kwargs to the cache and attention
_current = threading.local()  # the Step of the forward running on this thread, if any


@dataclass
class Step:
    """One paged forward's placement: per row b (in batch order)."""

    pool: KVPool
    slots: torch.Tensor  # (N, Q) where each query position's keys and values go (scratch for padding)
    queries: list[int]  # real query positions of each row (the last ones of the Q axis)
    tables: list[list[int]]  # self-attention: each row's block table
    lengths: list[int]  # and its key positions, the new ones included
    cross_slots: torch.Tensor | None = None  # T5 prefill: (N, S) where the encoder positions' keys go
    cross_tables: list[list[int]] = field(default_factory=list)  # T5: each row's encoder blocks
    cross_lengths: list[int] = field(default_factory=list)  # and its input length
    serials: list[int] = field(default_factory=list)  # a decoding step: each row's KV serial (paged_kv.RowKV)
    self_gathers: SelfGathers | None = None  # a decoding step: what earlier steps' gathers left (kept_gathers.py)
    cross_gathers: CrossGathers | None = None
    _runs: dict[bool, dict[int, list]] = field(default_factory=dict)
    _groups: dict[bool, tuple] = field(default_factory=dict)

    def runs(self, cross: bool, rows: list[int] | None = None) -> list[list[tuple[int, int]]]:
        """The slot runs (consecutive blocks merged) of these rows (default: all), self- or cross-attention; each
        row's worked out once per forward, when first asked for (a decoding step asks only for rows decoded
        alone)."""
        tables, lengths = (self.cross_tables, self.cross_lengths) if cross else (self.tables, self.lengths)
        known = self._runs.setdefault(cross, {})
        wanted = range(len(tables)) if rows is None else rows
        for row in wanted:
            if row not in known:
                known[row] = runs(tables[row], lengths[row], self.pool.block_size)
        return [known[row] for row in wanted]

    def groups(self, cross: bool) -> tuple[list[LengthGroup], list[int]]:
        """The rows' length groups for a decoding step, built once per forward for all layers."""
        if cross not in self._groups:
            tables, lengths = (self.cross_tables, self.cross_lengths) if cross else (self.tables, self.lengths)
            keys = self.pool.keys[0]

            def build():
                return decode_attention.length_groups(tables, lengths, self.pool.block_size, keys.device,
                                                      keys.shape[0] * keys.shape[2])
            kept = self.cross_gathers if cross else None
            self._groups[cross] = kept.groups(tables, lengths, build) if kept is not None else build()
            if not cross and self.self_gathers is not None:
                for group in self._groups[cross][0]:
                    self._name_rows(group)
        return self._groups[cross]

    def _name_rows(self, group: LengthGroup) -> None:
        """What SelfGathers needs of a self-attention group: its rows' serials and this step's slots."""
        group.serials = tuple(self.serials[row] for row in group.members)
        group.fresh = self.slots.view(-1) if group.everyone else self.slots.view(-1)[group.rows]  # (n,)


@contextlib.contextmanager
def paged(step: Step) -> Iterator[None]:
    _current.step = step
    try:
        yield
    finally:
        _current.step = None


def current() -> Step | None:
    return getattr(_current, "step", None)


class PoolCache(Cache):
    """What transformers' attention modules see as their cache during a paged forward: `update` writes the new keys
    and values into the pool (self-attention, or T5's cross-attention at prefill) and hands them back unchanged."""

    def __init__(self, cross: bool = False, layers: int = 0):
        self.cross = cross
        self.layers = [_Placeholder() for _ in range(layers)]  # T5 reads cross keys from here after prefill
        self.layer_class_to_replicate = None
        self.offloading = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        static = kwargs.get("kwargs", {}).get(STATIC_KWARG)
        if static is not None:  # a static-shaped decoding step (static_step.py): its slots came as an argument
            static.pool.write(layer_idx, static.slots, key_states, value_states)
            return key_states, value_states
        step = current()
        slots = step.cross_slots if self.cross else step.slots
        step.pool.write(layer_idx, slots, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False


class _Placeholder:
    """A cross-attention cache layer after prefill: T5 takes its keys' shape only (the pool holds the real ones)."""

    keys = torch.zeros(1, 1, 1, 1)
    values = torch.zeros(1, 1, 1, 1)
    is_initialized = True


def install(model, is_seq2seq: bool) -> None:
    """Make the decoder's attention paged-capable (idempotent)."""
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    config = model.get_decoder().config if is_seq2seq else model.config
    if config._attn_implementation == NAME:
        return
    fallback = config._attn_implementation or "sdpa"
    cross = {id(module) for module in cross_attentions(model)} if is_seq2seq else set()
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "config") and module.config is config:
            module._mhr_fallback = _implementation(module, fallback)
            module._mhr_cross = id(module) in cross
            module._mhr_bias = None
    config._attn_implementation = NAME
    if is_seq2seq:
        _T5Bias.attach(model)


def relative_bias(model) -> _T5Bias:
    """The T5 decoder's relative-bias table that install() attached (one, shared by every decoder layer)."""
    return model.get_decoder().block[0].layer[0].SelfAttention._mhr_bias


def _implementation(module, name: str):
    """The attention function the module would use without us (its own eager one for "eager")."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return AttentionInterface().get_interface(name, eager)


def cross_attentions(model) -> list:
    """A T5 model's cross-attention modules, one per decoder layer, in layer order."""
    return [layer.EncDecAttention for block in model.get_decoder().block for layer in block.layer
            if hasattr(layer, "EncDecAttention")]


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    static = kwargs.get(STATIC_KWARG)
    if static is not None:
        return _static_decode(module, query, static, scaling), None
    step = current()
    if step is None:
        return module._mhr_fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    **kwargs)
    cross = module._mhr_cross
    if query.shape[2] == 1:
        return _decode(module, query, step, cross, scaling, None if cross else module._mhr_bias), None
    rows = step.runs(cross)
    bias = None if cross else module._mhr_bias
    width = query.shape[2]
    outs = []
    for row, row_runs in enumerate(rows):
        keys, values = _row_keys(step.pool, module.layer_idx, row_runs, query.dtype)  # (Hkv, L, d)
        count = width if cross else step.queries[row]
        q = query[row, :, width - count:]  # (Hq, q, d)
        mask = _mask(bias, count, keys.shape[1], q.dtype, q.device, causal=not cross)
        outs.append(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True))
    padded = query.new_zeros(query.shape)  # rows with fewer real queries: their padded positions stay 0
    for row, out in enumerate(outs):
        padded[row, :, width - out.shape[1]:] = out
    return padded.transpose(1, 2), None  # (N, Q, Hq, d)


def _row_keys(pool: KVPool, layer: int, runs: list[tuple[int, int]], dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's keys and values (Hkv, L, d) in the query's dtype: a view of the pool when its runs are one."""
    keys, values = pool.read(layer, runs)
    if keys.dtype != dtype:
        keys, values = keys.to(dtype), values.to(dtype)
    return keys, values


def _decode(module, query: torch.Tensor, step: Step, cross: bool, scale: float | None, bias: _T5Bias | None
            ) -> torch.Tensor:
    """A decoding step (one query per row), decode_attention.py's: query (N, Hq, 1, d) -> (N, 1, Hq, d)."""
    count, heads_q, _, dim = query.shape
    scale = dim ** -0.5 if scale is None else scale
    if scale != 1.0:
        query = query * scale  # once for every row
    out = decode_attention.attend(step.pool, module.layer_idx, query.view(count, heads_q, dim), step, cross, bias)
    return out.view(count, 1, heads_q, dim)


def _static_decode(module, query: torch.Tensor, static, scale: float | None) -> torch.Tensor:
    """A static-shaped decoding step (static_step.StaticInputs in the forward's kwargs): query (B, Hq, 1, d) ->
    (B, 1, Hq, d) over the padded block tables it carries."""
    count, heads_q, _, dim = query.shape
    scale = dim ** -0.5 if scale is None else scale
    if scale != 1.0:
        query = query * scale
    cross = module._mhr_cross
    tables, lengths = (static.cross_tables, static.cross_lengths) if cross else (static.tables, static.lengths)
    out = decode_attention.static_tables(static.pool, module.layer_idx, query.view(count, heads_q, dim), tables,
                                         lengths, None if cross else module._mhr_bias)
    return out.view(count, 1, heads_q, dim)


def _mask(bias: _T5Bias | None, queries: int, keys: int, dtype: torch.dtype, device: torch.device, *, causal: bool
          ) -> torch.Tensor | None:
    """(H|1, q, L): T5's relative bias by distance, and -inf above the causal diagonal (query i at L - q + i)."""
    if bias is not None:
        return bias.last_query(keys, dtype) if queries == 1 else bias.for_rows(queries, keys, dtype)
    if not causal or queries == 1:
        return None
    positions = torch.arange(keys, device=device)[None, :]  # (1, L)
    last_seen = torch.arange(keys - queries, keys, device=device)[:, None]  # (q, 1)
    return (positions <= last_seen)[None]  # (1, q, L) bool


class _T5Bias:
    """T5's decoder self-attention bias, looked up by query-key distance for any row's length (the model computes
    it for one shared length per batch, which paged rows do not have)."""

    def __init__(self, attention):
        self.attention = attention  # the first decoder layer's self-attention: it holds the bias table
        self._by_distance: torch.Tensor | None = None  # (H, D): bias of distance d at [:, d]
        self._reversed: dict[torch.dtype, torch.Tensor] = {}  # (H, 1, D): distance D-1 … 0, in a dtype

    @classmethod
    def attach(cls, model) -> None:
        first = model.get_decoder().block[0].layer[0].SelfAttention
        bias = cls(first)
        for block in model.get_decoder().block:
            block.layer[0].SelfAttention._mhr_bias = bias

    def by_distance(self, length: int) -> torch.Tensor:
        if self._by_distance is None or self._by_distance.shape[1] < length:
            size = max(length, 1024)
            with torch.no_grad():  # query at position size - 1 over keys 0..size-1: distances size-1 … 0
                full = self.attention.compute_bias(1, size, past_seen_tokens=size - 1)[0, :, 0]  # (H, size)
            self._by_distance = full.flip(-1).float()
            self._reversed = {}
        return self._by_distance

    def last_query(self, keys: int, dtype: torch.dtype) -> torch.Tensor:
        """(H, 1, L) for a query at the last of L positions: a view of one reversed table, no computation."""
        table = self.by_distance(keys)
        if dtype not in self._reversed:
            self._reversed[dtype] = table.flip(-1)[:, None, :].to(dtype)
        return self._reversed[dtype][:, :, -keys:]

    def for_rows(self, queries: int, keys: int, dtype: torch.dtype) -> torch.Tensor:
        """(H, q, L): query i (at position L - q + i) over keys 0..L-1, -inf for keys after it."""
        table = self.by_distance(keys)
        positions = torch.arange(keys, device=table.device)
        distance = positions[keys - queries:, None] - positions[None, :]  # (q, L)
        bias = table[:, distance.clamp(min=0)]  # (H, q, L)
        return bias.masked_fill(distance[None] < 0, float("-inf")).to(dtype)


def avoid_per_length_attention_plans(device: torch.device | str) -> None:
    """Each row's attention has its own key length, which grows every step. cuDNN's fused attention builds (and
    caches) a plan per shape: on an H200 with torch 2.11 a decoding step spent ~70 ms building plans (82 ms per step,
    10 ms without cuDNN). Flash, memory-efficient and math attention have no per-shape plan; this turns cuDNN
    attention off for the process (a global switch)."""
    if torch.device(device).type == "cuda" and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
