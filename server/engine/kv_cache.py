"""Row surgery on transformers' KV caches: drop rows, pad along the sequence axis, join two batches.

transformers' `DynamicCache` can select rows (`batch_select_indices`) but not join two batches; continuous
batching needs both. Every function here works on the per-layer tensors of a cache made of plain
`DynamicLayer`s (full attention), each (N, heads, P, head_dim):

    select_rows(cache, keep)        cache[keep]                      (rows leave, or are reordered)
    pad_columns(cache, left, right) zeros before / after the P axis   (a masked position: never read)
    join_rows(a, b)                 cat along N                       (both already of one length P)
    drop_columns(cache, left)       cache[:, :, left:]                (a view: padding every row shares)
Sliding-window, quantised or linear-attention layers hold more than keys and values per position, so
`supports_row_surgery` refuses them (the engine then serves that model with request-level batching).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer


def supports_row_surgery(cache: DynamicCache) -> bool:
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _filled(cache: DynamicCache) -> list[DynamicLayer]:
    return [layer for layer in cache.layers if layer.is_initialized and layer.keys is not None and layer.keys.numel()]


def select_rows(cache: DynamicCache, keep: torch.Tensor) -> None:
    """Keep rows `keep` (int64 indices, in their new order)."""
    for layer in _filled(cache):
        layer.keys = layer.keys.index_select(0, keep)  # (n, heads, P, d)
        layer.values = layer.values.index_select(0, keep)


def pad_columns(cache: DynamicCache, left: int, right: int = 0) -> None:
    """Zeros before (left) and after (right) every row's positions; the caller masks them."""
    if left == 0 and right == 0:
        return
    for layer in _filled(cache):
        layer.keys = F.pad(layer.keys, (0, 0, left, right))  # (N, heads, left + P + right, d)
        layer.values = F.pad(layer.values, (0, 0, left, right))


def drop_columns(cache: DynamicCache, left: int = 0, right: int = 0) -> None:
    """Forget the first `left` and last `right` positions (padding for every row): views, no copy."""
    if left == 0 and right == 0:
        return
    for layer in _filled(cache):
        end = layer.keys.shape[2] - right
        layer.keys = layer.keys[:, :, left:end]
        layer.values = layer.values[:, :, left:end]


def join_rows(first: DynamicCache, second: DynamicCache) -> None:
    """Append `second`'s rows to `first` (in place); both must have one sequence length."""
    for mine, theirs in zip(first.layers, second.layers, strict=True):
        if not theirs.is_initialized:
            continue
        if not mine.is_initialized or mine.keys is None or not mine.keys.numel():
            mine.lazy_initialization(theirs.keys, theirs.values)
            mine.keys, mine.values = theirs.keys, theirs.values
            continue
        mine.keys = torch.cat([mine.keys, theirs.keys])  # (N + M, heads, P, d)
        mine.values = torch.cat([mine.values, theirs.values])


def cache_length(cache: DynamicCache) -> int:
    filled = _filled(cache)
    return filled[0].keys.shape[2] if filled else 0
