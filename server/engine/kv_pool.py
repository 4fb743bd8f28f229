"""The KV pool: every decoder layer's keys and values in one preallocated tensor each, cut into fixed-size blocks
(block b holds slots b·S … b·S + S - 1, S = block_size). Block 0 is scratch: padded query positions write there, and
a decoding group reads it (masked) as padding.

    keys[layer], values[layer]:  (kv_heads, blocks · S, head_dim)
A row's keys are the slots of its block table in order; consecutive blocks make one contiguous run, which attention
reads as a view (no copy).
"""

from __future__ import annotations

import torch

SCRATCH_BLOCK = 0


def kv_layout(config) -> tuple[int, int, int]:
    """(decoder layers, key/value heads, head dim) of a model's decoder (a seq2seq model's encoder positions cost
    the same in its cross-attention)."""
    text = config.get_text_config(decoder=True)
    layers = getattr(text, "num_decoder_layers", None) or text.num_hidden_layers
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or getattr(text, "d_kv", None) or \
        text.hidden_size // text.num_attention_heads
    return layers, heads, head_dim


class KVPool:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, *, zeroed: bool = False):
        """zeroed: every block starts at 0 (the static-shaped step reads whole blocks, masked past each row's
        length, and needs finite values there). Otherwise uninitialised: nothing is read before it is written, and
        on a CPU the pages are only committed as blocks are first written (the pool costs resident memory as it
        fills, not at start-up)."""
        self.block_size = block_size
        self.blocks = blocks
        slots = blocks * block_size
        make = torch.zeros if zeroed else torch.empty
        self.keys = [make(kv_heads, slots, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [make(kv_heads, slots, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        for tensor in (*self.keys, *self.values):  # scratch is read (masked) as padding: never NaN
            tensor[:, :block_size] = 0

    @classmethod
    def for_model(cls, config, positions: int, block_size: int, dtype: torch.dtype, device: torch.device, *,
                  zeroed: bool = False) -> KVPool:
        """A pool of `positions` positions in blocks of `block_size`, plus the scratch block and one block of
        rounding (a T5 row's input and output each end in a partly filled block)."""
        layers, heads, head_dim = kv_layout(config)
        return cls(layers, heads, head_dim, -(-positions // block_size) + 2, block_size, dtype, device, zeroed=zeroed)

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """slots (N, Q) int64; keys and values (N, kv_heads, Q, head_dim) -> written at those slots."""
        heads, dim = keys.shape[1], keys.shape[3]
        flat = slots.reshape(-1)
        self.keys[layer].index_copy_(1, flat, keys.transpose(0, 1).reshape(heads, -1, dim).to(self.keys[layer].dtype))
        self.values[layer].index_copy_(1, flat, values.transpose(0, 1).reshape(heads, -1, dim)
                                       .to(self.values[layer].dtype))

    def read(self, layer: int, runs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's keys and values (kv_heads, L, head_dim) from its slot runs [(start, end), ...]: one run, a view."""
        keys, values = self.keys[layer], self.values[layer]
        if len(runs) == 1:
            start, end = runs[0]
            return keys[:, start:end], values[:, start:end]
        return (torch.cat([keys[:, s:e] for s, e in runs], dim=1),  # (kv_heads, L, head_dim)
                torch.cat([values[:, s:e] for s, e in runs], dim=1))

    def copy_block(self, source: int, target: int) -> None:
        """Copy-on-write: block `target` gets block `source`'s keys and values in every layer."""
        size = self.block_size
        src, dst = slice(source * size, (source + 1) * size), slice(target * size, (target + 1) * size)
        for tensors in (self.keys, self.values):
            for layer in tensors:
                layer[:, dst] = layer[:, src]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values))


def runs(table: list[int], length: int, block_size: int) -> list[tuple[int, int]]:
    """The slot runs [(start, end), ...] holding the first `length` positions of a block table: consecutive blocks
    merge into one run."""
    found: list[tuple[int, int]] = []
    remaining = length
    for block in table:
        if remaining <= 0:
            break
        take = min(block_size, remaining)
        start = block * block_size
        if found and found[-1][1] == start and found[-1][1] - found[-1][0] >= 0:
            found[-1] = (found[-1][0], start + take)
        else:
            found.append((start, start + take))
        remaining -= take
    return found


def slot_of(table: list[int], position: int, block_size: int) -> int:
    """The slot of one position of a row."""
    return table[position // block_size] * block_size + position % block_size


def slots_of(table: list[int], positions: range, block_size: int) -> list[int]:
    """The slot of each position of a row."""
    return [slot_of(table, p, block_size) for p in positions]
