"""The running rows' keys and values in the KV pool, and the two forwards the serving loop runs on them.

    prefill(rows, sequences, inputs)   new rows: the tokens not yet in the pool (a prefix-cache hit skips the
                                       leading full blocks) -> their next-token logits (M, V)
                                       causal LM: sequence = prompt (+ tokens generated before a preemption)
                                       T5: inputs = the encoder's tokens, sequence = start token (+ generated)
    encode(rows, inputs)               T5 rows that start from the start token: their encoder and cross-attention
                                       keys only; their first decoding step runs the start token
    decode(rows, tokens)               one token per row -> logits (N, V)
    make_room(rows)                    the blocks the next decode step writes (new blocks, copy-on-write of a
                                       shared last block); the rows that must be preempted when the pool is short
    follow(row, parent)                a beam takes its parent's blocks (shared; copied on its next write)
    release(row)                       its blocks go back (cached where they are full prompt blocks)
Each row carries a RowKV: its block table and length (and for T5 its encoder blocks and length).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import EncoderDecoderCache

from .block_manager import BlockManager, prefix_hash
from .decoder_forward import decoder_forward
from .int_tensors import long_tensor
from .kept_gathers import CrossGathers, SelfGathers
from .kv_pool import SCRATCH_BLOCK, KVPool, slot_of, slots_of
from .paged_attention import PoolCache, Step, cross_attentions, paged
from .static_step import StaticDecode

PAD_SLOT = SCRATCH_BLOCK  # slot 0 of the scratch block
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # a prepared 4D mask: transformers builds none (we mask per row)


_serials = itertools.count(1)


@dataclass
class RowKV:
    table: list[int] = field(default_factory=list)  # decoder self-attention (causal LM: all) positions' blocks
    length: int = 0  # positions written
    cross: list[int] = field(default_factory=list)  # T5: the encoder output's blocks (cross-attention keys)
    cross_length: int = 0
    from_cache: int = 0  # leading positions the prefix cache gave at placement
    serial: int = field(default_factory=lambda: next(_serials))  # names these positions for kept_gathers.py


class PagedKV:
    def __init__(self, model, is_seq2seq: bool, device: torch.device, pool: KVPool, blocks: BlockManager,
                 pad_id: int, static: StaticDecode | None = None):
        """static: the static-shaped decoding step, where configured (decode(..., static=True) runs it)."""
        self.static = static
        self.model = model
        self.is_seq2seq = is_seq2seq
        self.device = device
        self.pool = pool
        self.blocks = blocks
        self.pad_id = pad_id
        self.size = pool.block_size
        self.layers = len(pool.keys)
        self.encoder_hits = 0  # T5 rows whose encoder output came from the cache
        self.cross_attentions = cross_attentions(model) if is_seq2seq else []  # T5: written by encode()
        self.cross_gathers = CrossGathers()  # T5 decoding steps' cross keys, gathered once per batch layout
        # decoding groups' keys, grown by one position per step: on a CPU, where copies cost; on a GPU a gather is one
        # launch and growing a copy takes two per tensor (launches dominate there)
        self.self_gathers = SelfGathers(pool) if torch.device(device).type == "cpu" else None

    # ---- admission ------------------------------------------------------------------------------
    def blocks_needed(self, sequence: int, inputs: int = 0) -> int:
        """Blocks a new row takes at its prefill (before any prefix hit)."""
        return self.blocks.blocks_for(sequence) + self.blocks.blocks_for(inputs)

    def prefill(self, rows: list, sequences: list[list[int]], inputs: list[list[int]] | None = None, *,
                limit: int | None = None, before_forward: Callable[[torch.Tensor], None] = lambda mask: None
                ) -> torch.Tensor:
        """Place new rows and run their tokens not yet in the pool (their KV lands there) -> the logits after each
        row's last computed token (M, V). limit: at most this many tokens per row (a long prompt in chunks: call
        again for the rest; a row is complete when row.kv.length == len(its sequence)).
        before_forward(prompt_mask) is told, just before the forward, which positions of its input are the rows'
        prompt tokens: (M, Q) of the new tokens (causal LM, left-padded), or (M, S) of the encoder's input (T5)."""
        starts = [row.kv.length if getattr(row, "kv", None) and row.kv.table else self.place(row, seq)
                  for row, seq in zip(rows, sequences, strict=True)]
        ends = [len(seq) if limit is None else min(len(seq), start + limit)
                for seq, start in zip(sequences, starts, strict=True)]
        width = max(end - start for start, end in zip(starts, ends, strict=True))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        slots = torch.full((len(rows), width), PAD_SLOT, dtype=torch.long)
        for i, (row, seq, start, end) in enumerate(zip(rows, sequences, starts, ends, strict=True)):
            count = end - start
            ids[i, width - count:] = torch.tensor(seq[start:end])
            positions[i, width - count:] = torch.arange(start, end)
            slots[i, width - count:] = torch.tensor(slots_of(row.kv.table, range(start, end), self.size))
            row.kv.length = end
        step = Step(self.pool, slots.to(self.device), [end - start for start, end in zip(starts, ends, strict=True)],
                    [r.kv.table for r in rows], [r.kv.length for r in rows])
        if self.is_seq2seq:
            logits = self._seq2seq_prefill(rows, inputs, ids, step, before_forward)
        else:
            before_forward(slots != PAD_SLOT)
            with torch.inference_mode(), paged(step):
                out = self.model(input_ids=ids.to(self.device), position_ids=positions.to(self.device),
                                 attention_mask=_NO_MASK, cache=PoolCache(), use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
        for row, seq in zip(rows, sequences, strict=True):
            if row.kv.length == len(seq):
                self._register(row, seq)
        return logits

    def place(self, row, sequence: list[int]) -> int:
        """Give a new row its blocks (leading ones from the prefix cache when they hold the same tokens under the
        same adapter); return the first position still to compute (at least the last one is computed). Called by
        prefill, or before it for a prompt prefilled in chunks. MemoryError when the pool is short."""
        kv = row.kv = getattr(row, "kv", None) or RowKV()
        hits = self.blocks.cached_prefix(self._hashes(row, sequence)[: (len(sequence) - 1) // self.size])
        kv.table = list(hits)
        more = self.blocks.blocks_for(len(sequence)) - len(hits)
        fresh = self.blocks.allocate(more, after=hits[-1] if hits else None)
        if fresh is None:
            self.blocks.release(hits)
            raise MemoryError("the KV pool has too few free blocks for this row")  # the policy admits within them
        kv.table += fresh
        kv.length = kv.from_cache = len(hits) * self.size  # what the prefix cache gave; the rest is computed
        return kv.length

    def uncached_first_block(self, row, sequence: list[int]) -> int | None:
        """The prefix hash of the sequence's first block, where it is full (and more follows) and not cached."""
        if len(sequence) <= self.size or not self.blocks.prefix_cache:
            return None
        first = self._hashes(row, sequence[: self.size])[0]
        return None if self.blocks.cached_count([first]) else first

    def place_again(self, row, sequence: list[int]) -> None:
        """A placed row that has computed nothing yet takes the prefix blocks cached since it was placed (rows of a
        shared prompt admitted together: each prefills after the one before has registered its blocks)."""
        kv = row.kv
        if kv.length != kv.from_cache:
            return
        hashes = self._hashes(row, sequence)[: (len(sequence) - 1) // self.size]
        if self.blocks.cached_count(hashes) * self.size > kv.from_cache:
            self.release(row)
            self.place(row, sequence)

    def _hashes(self, row, sequence: list[int]) -> list[int]:
        """The prefix hashes of the sequence's full blocks (chained: each names all tokens before it)."""
        hashes, parent = [], None
        for start in range(0, len(sequence) - self.size + 1, self.size):
            parent = prefix_hash(parent, row.key, sequence[start: start + self.size])
            hashes.append(parent)
        return hashes

    def reuse_encoder(self, row, inputs: list[int]) -> bool:
        """T5: a row whose adapter encoded this same input before, its encoder blocks still cached, takes them
        (shared) and will skip its encoder (prefill then runs the decoder alone: a batch of such rows only)."""
        if not self.is_seq2seq:
            return False
        hits = self.blocks.cached_all(self._encoder_hashes(row, inputs))
        if not hits:
            return False
        row.kv = RowKV(cross=hits, cross_length=len(inputs))
        self.encoder_hits += 1
        return True

    def _encoder_hashes(self, row, inputs: list[int]) -> list[int]:
        """Each encoder block's name: the adapter, the whole input (every block depends on all of it), its index."""
        whole = hash(tuple(inputs))
        return [prefix_hash(("encoder", whole, len(inputs), i), row.key, ())
                for i in range(self.blocks.blocks_for(len(inputs)))]

    def _register(self, row, sequence: list[int]) -> None:
        if not self.is_seq2seq:  # T5's decoder positions start from one token: no prefix worth sharing
            for block, digest in zip(row.kv.table, self._hashes(row, sequence), strict=False):
                self.blocks.register(block, digest)

    def encode(self, rows: list, inputs: list[list[int]], before_forward: Callable[[torch.Tensor], None]) -> None:
        """T5 rows that start from the decoder's start token: the encoder over each row's input (right-padded) and
        each decoder layer's cross-attention keys and values of its output, written into the row's encoder blocks,
        with no decoder forward: the start token is the row's first decoding step, taken with the running rows.
        Rows whose encoder blocks came from reuse_encoder (all of them, or none) need nothing."""
        for row in rows:
            row.kv = getattr(row, "kv", None) or RowKV()
        if rows[0].kv.cross:
            return
        enc, mask, cross_slots = self._encoder_inputs(rows, inputs)
        before_forward(mask.bool())
        with torch.inference_mode():
            hidden = self.model.get_encoder()(input_ids=enc.to(self.device),
                                              attention_mask=mask.to(self.device)).last_hidden_state  # (M, S, d)
            slots = cross_slots.to(self.device)
            for layer, attention in enumerate(self.cross_attentions):
                shape = (*hidden.shape[:-1], -1, attention.key_value_proj_dim)  # (M, S, H, d_kv)
                self.pool.write(layer, slots, attention.k(hidden).view(shape).transpose(1, 2),
                                attention.v(hidden).view(shape).transpose(1, 2))
        self._register_encoder(rows, inputs)

    def _seq2seq_prefill(self, rows: list, inputs: list[list[int]], ids: torch.Tensor, step: Step,
                         before_forward: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Encoder over each row's input (right-padded), its cross-attention keys into the row's encoder blocks
        (named for reuse_encoder), then the decoder over the rows' new decoder tokens. Rows whose encoder blocks
        came from reuse_encoder (all of them, or none) run the decoder alone."""
        if rows[0].kv.cross:
            step.cross_tables, step.cross_lengths = [r.kv.cross for r in rows], [r.kv.cross_length for r in rows]
            before_forward(_input_mask(inputs).bool())
            with paged(step):
                return decoder_forward(self.model, True, self.layers, ids.to(self.device), None, _NO_MASK)
        enc, mask, cross_slots = self._encoder_inputs(rows, inputs)
        step.cross_slots = cross_slots.to(self.device)
        step.cross_tables, step.cross_lengths = [r.kv.cross for r in rows], [r.kv.cross_length for r in rows]
        cache = EncoderDecoderCache(PoolCache(), PoolCache(cross=True, layers=self.layers))
        before_forward(mask.bool())
        with torch.inference_mode(), paged(step):
            out = self.model(input_ids=enc.to(self.device), attention_mask=mask.to(self.device),
                             decoder_input_ids=ids.to(self.device), decoder_attention_mask=_NO_MASK, cache=cache,
                             use_cache=True)
        self._register_encoder(rows, inputs)
        return out.logits[:, -1]

    def _encoder_inputs(self, rows: list, inputs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's encoder blocks allocated (MemoryError when the pool is short) -> the encoder's ids (M, S),
        right-padded, their mask (M, S) and each position's slot in the row's blocks (M, S; padding: PAD_SLOT)."""
        self.cross_gathers.clear()  # encoder keys are written: a kept gather may hold a block's old keys
        mask = _input_mask(inputs)
        enc = torch.full(mask.shape, self.pad_id, dtype=torch.long)
        cross_slots = torch.full(mask.shape, PAD_SLOT, dtype=torch.long)
        for i, (row, x) in enumerate(zip(rows, inputs, strict=True)):
            enc[i, : len(x)] = torch.tensor(x)
            cross = self.blocks.allocate(self.blocks.blocks_for(len(x)))
            if cross is None:  # (the row keeps what it holds: releasing it frees its blocks)
                raise MemoryError("the KV pool has too few free blocks for this row's input")
            row.kv.cross = cross
            row.kv.cross_length = len(x)
            cross_slots[i, : len(x)] = torch.tensor(slots_of(row.kv.cross, range(len(x)), self.size))
        return enc, mask, cross_slots

    def _register_encoder(self, rows: list, inputs: list[list[int]]) -> None:
        """The rows' encoder blocks, named by adapter and input, for reuse_encoder."""
        for row, x in zip(rows, inputs, strict=True):
            for block, digest in zip(row.kv.cross, self._encoder_hashes(row, x), strict=True):
                self.blocks.register(block, digest)

    # ---- decoding ---------------------------------------------------------------------------------
    def make_room(self, rows: list) -> list:
        """Blocks for every row's next position; when the pool runs out, the newest rows (last in `rows`) are
        preempted (returned, blocks released) until the others fit."""
        preempted: list = []
        needs = [self._needs_block(row) for row in rows]
        while sum(needs) > self.blocks.available() and len(preempted) < len(rows):
            victim = rows[-1 - len(preempted)]
            preempted.append(victim)
            needs[len(rows) - len(preempted)] = False
            self.release(victim)
        for row, need in zip(rows, needs, strict=True):
            if need and row not in preempted:
                self._write_block(row)
        return preempted

    def _needs_block(self, row) -> bool:
        kv = row.kv
        return kv.length % self.size == 0 or self.blocks.refs[kv.table[-1]] > 1

    def _write_block(self, row) -> None:
        """The block the row's next position goes to: a new one, or its own copy of a shared last block."""
        kv = row.kv
        if kv.length % self.size == 0:
            kv.table += self.blocks.allocate(1, after=kv.table[-1] if kv.table else None)
            return
        shared = kv.table[-1]
        own = self.blocks.allocate(1, after=kv.table[-2] if len(kv.table) > 1 else None)[0]
        self.pool.copy_block(shared, own)
        self.blocks.release([shared])
        kv.table[-1] = own

    def decode(self, rows: list, tokens: list[int], *, static_width: int | None = None) -> torch.Tensor:
        """One token per row (its blocks made room for by make_room) -> logits (N, V). static_width: through the
        static-shaped step (static_step.py), padded to this many rows (the layers pointed at them)."""
        if static_width is not None:
            return self.static.decode(rows, tokens, static_width)
        slots = long_tensor(slot_of(r.kv.table, r.kv.length, self.size) for r in rows)[:, None]  # (N, 1)
        positions = long_tensor(r.kv.length for r in rows)[:, None]  # (N, 1)
        for row in rows:
            row.kv.length += 1
        step = Step(self.pool, slots.to(self.device), [1] * len(rows), [r.kv.table for r in rows],
                    [r.kv.length for r in rows], serials=[r.kv.serial for r in rows], self_gathers=self.self_gathers)
        if self.is_seq2seq:
            step.cross_tables, step.cross_lengths = [r.kv.cross for r in rows], [r.kv.cross_length for r in rows]
            step.cross_gathers = self.cross_gathers
        ids = long_tensor(tokens).to(self.device)[:, None]  # (N, 1)
        with paged(step):
            return decoder_forward(self.model, self.is_seq2seq, self.layers, ids, positions.to(self.device),
                                   _NO_MASK)

    # ---- beams and release -------------------------------------------------------------------------
    def follow(self, rows: list, parents: list) -> None:
        """Beams continue their parents (rows[i] after parents[i], all at once): each holds its parent's blocks,
        shared, copied when it next writes."""
        old = [row.kv for row in rows]
        new = [RowKV(list(p.kv.table), p.kv.length, list(p.kv.cross), p.kv.cross_length) for p in parents]
        for row, kv in zip(rows, new, strict=True):
            self.blocks.share(kv.table + kv.cross)
            row.kv = kv
        for kv in old:
            if kv is not None:
                self.blocks.release(kv.table + kv.cross)

    def release(self, row) -> None:
        kv = getattr(row, "kv", None)
        if kv is not None:
            self.blocks.release(kv.table + kv.cross)
            row.kv = None


def _input_mask(inputs: list[list[int]]) -> torch.Tensor:
    """(M, S) 1 where a row's (right-padded) encoder input has a token."""
    mask = torch.zeros((len(inputs), max(len(x) for x in inputs)), dtype=torch.long)
    for i, x in enumerate(inputs):
        mask[i, : len(x)] = 1
    return mask
