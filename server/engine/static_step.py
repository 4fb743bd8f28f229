"""A decoding step with static shapes: the same step as PagedKV.decode, with every per-step value in tensors whose
shapes depend on a bucket only — so that on CUDA each bucket's forward is captured once as a CUDA graph and then
replayed with no kernel launched from Python (MHR_CUDA_GRAPHS). "eager" runs the same step without graphs (tests).
torch.compile of this step was tried on a CPU and lost (tiny Llama, 16 rows: paged 1.60 ms, static 2.69 ms,
compiled 2.78 ms per step, ~1 s of compiling per new bucket): not kept.

    rows      padded up to the next ROW_BUCKETS size; a padding row decodes a pad token at position 0, writes its
              key to the scratch block and reads only that
    tables    block tables padded with scratch up to the next power of two of blocks; attention gathers each row's
              table and masks the positions past its length (decode_attention.static_tables)
    adapters  the layers run rows [0, B) of the row pool: positions past the batch hold zeros or an earlier row's
              adapter, and their rows are padding; merged, shared and bare layers do not depend on B
The step's inputs travel down the model's own kwargs (paged_attention.STATIC_KWARG) to the cache and attention.
A batch with Arrow rows goes through PagedKV.decode instead (beams are rows like any other: their caches follow
their parents between steps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from .decoder_forward import decoder_forward
from .int_tensors import long_tensor
from .kv_pool import SCRATCH_BLOCK, KVPool, slot_of
from .paged_attention import STATIC_KWARG, relative_bias

log = logging.getLogger(__name__)
ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MODES = ("eager", "cuda-graphs")


@dataclass
class StaticInputs:
    pool: KVPool
    ids: torch.Tensor  # (B, 1) the token each row decodes (pad for padding rows)
    positions: torch.Tensor  # (B, 1) its position
    slots: torch.Tensor  # (B, 1) where its key and value go (scratch for padding rows)
    tables: torch.Tensor  # (B, W) block tables, scratch-padded
    lengths: torch.Tensor  # (B,) key positions per row, the new one included (1 for padding rows)
    cross_tables: torch.Tensor | None = None  # T5: (B, Wc) the encoder output's blocks
    cross_lengths: torch.Tensor | None = None  # T5: (B,) input lengths

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def shape_key(self) -> tuple:
        return tuple((name, tuple(t.shape)) for name, t in self.tensors().items())

    def copy_from(self, other: StaticInputs) -> None:
        """Write another step's values into these tensors (a captured graph reads them where they are)."""
        for name, tensor in self.tensors().items():
            tensor.copy_(getattr(other, name), non_blocking=True)


def row_bucket(rows: int) -> int:
    return next((b for b in ROW_BUCKETS if b >= rows), rows)


def block_bucket(blocks: int) -> int:
    return 1 << max(blocks - 1, 0).bit_length()


def static_inputs(pool: KVPool, rows: list, tokens: list[int], pad_id: int, device: torch.device,
                  seq2seq: bool, count: int | None = None) -> StaticInputs:
    """The step's tensors for rows whose blocks have room for their next position (PagedKV.make_room), padded to
    `count` rows (default: their bucket)."""
    size, count = pool.block_size, row_bucket(len(rows)) if count is None else count
    lengths = [r.kv.length for r in rows]
    ids = tokens + [pad_id] * (count - len(rows))
    positions = lengths + [0] * (count - len(rows))
    slots = [slot_of(r.kv.table, n, size) for r, n in zip(rows, lengths, strict=True)]
    slots += [SCRATCH_BLOCK * size] * (count - len(rows))
    tables, new_lengths = _padded([r.kv.table for r in rows], [n + 1 for n in lengths], count)
    out = StaticInputs(pool, _col(ids, device), _col(positions, device), _col(slots, device), tables.to(device),
                       new_lengths.to(device))
    if seq2seq:
        cross, cross_lengths = _padded([r.kv.cross for r in rows], [r.kv.cross_length for r in rows], count)
        out.cross_tables, out.cross_lengths = cross.to(device), cross_lengths.to(device)
    return out


def _col(values: list[int], device: torch.device) -> torch.Tensor:
    return long_tensor(values)[:, None].to(device)


def _padded(tables: list[list[int]], lengths: list[int], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) tables padded with scratch to a power of two of blocks, and (B,) lengths (1 for padding rows)."""
    width = block_bucket(max(len(t) for t in tables))
    padded = [t + [SCRATCH_BLOCK] * (width - len(t)) for t in tables]
    padded += [[SCRATCH_BLOCK] * width] * (count - len(tables))
    return torch.tensor(padded, dtype=torch.long), torch.tensor(lengths + [1] * (count - len(lengths)))


class StaticDecode:
    """Runs static-shaped decoding steps: eagerly, or as CUDA graphs captured per bucket and adapter layout
    (`layout`: where the layers' adapter tensors are)."""

    def __init__(self, model, seq2seq: bool, pool: KVPool, device: torch.device, pad_id: int, mode: str,
                 layout: Callable[[], tuple]):
        if mode not in MODES:
            raise ValueError(f"static step mode must be one of {MODES}, not {mode!r}")
        if mode == "cuda-graphs" and torch.device(device).type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.seq2seq, self.pool, self.device, self.pad_id = model, seq2seq, pool, device, pad_id
        self.mode = mode
        self.layout = layout
        self.no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
        if seq2seq:  # computed once for the widest step (tables padded to a power of two of blocks), never again:
            relative_bias(model).by_distance(2 * pool.blocks * pool.block_size)  # a captured graph reads it in place
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, StaticInputs, torch.Tensor]] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if mode == "cuda-graphs" else None
        self.captures = 0
        self.steps = 0  # decoding steps it ran

    def decode(self, rows: list, tokens: list[int], width: int) -> torch.Tensor:
        """One token per row, padded to `width` rows (the rows the layers were pointed at) -> logits (N, V); the
        rows' lengths grow by one."""
        inputs = static_inputs(self.pool, rows, tokens, self.pad_id, self.device, self.seq2seq, width)
        for row in rows:
            row.kv.length += 1
        self.steps += 1
        if self.mode == "cuda-graphs":
            return self._replay(inputs, len(rows))[: len(rows)].clone()
        return self.forward(inputs)[: len(rows)]

    def forward(self, inputs: StaticInputs) -> torch.Tensor:
        """The model over one static step -> logits (B, V)."""
        return decoder_forward(self.model, self.seq2seq, len(self.pool.keys), inputs.ids, inputs.positions,
                               self.no_mask, **{STATIC_KWARG: inputs})

    def _replay(self, inputs: StaticInputs, rows: int) -> torch.Tensor:
        key = (inputs.shape_key(), self.layout())
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._graphs[key] = self._capture(inputs, rows)
            except GraphCheckFailed as failure:  # the step still runs, without graphs
                log.error("CUDA graphs turned off: %s", failure)
                self.mode = "eager"
                return failure.logits
        graph, static, logits = entry
        static.copy_from(inputs)
        graph.replay()
        return logits

    def _capture(self, inputs: StaticInputs, rows: int) -> tuple[torch.cuda.CUDAGraph, StaticInputs, torch.Tensor]:
        """Warm the bucket up on a side stream (lazy initialisations happen there), capture it, replay it once and
        check the replay's first `rows` rows against the warm-up's eager logits (GraphCheckFailed, with the eager
        logits, if capturing fails or they differ). Every pass writes this step's keys, the same values each time.
        Padding rows are not compared: they all write their key to the one scratch slot, and which of them writes
        last is up to the card, so what they read back may differ from pass to pass (the demo on an H200: up to 4.25
        in their logits); their logits are discarded and no real row reads that slot."""
        static = StaticInputs(self.pool, **{name: t.clone() for name, t in inputs.tensors().items()})
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            eager = self.forward(static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work of the server's other threads (an /adapt job's optimizer step, a cache miss
            # routed on the card) may go on during a capture; in "global" mode it would fail, and end the capture
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                logits = self.forward(static)
            graph.replay()
        except RuntimeError as error:
            raise GraphCheckFailed(f"capturing a step of {static.ids.shape[0]} rows failed: {error}", eager) from error
        replayed, expected = logits[:rows].float(), eager[:rows].float()
        if not torch.allclose(replayed, expected, rtol=1e-3, atol=1e-3):
            raise GraphCheckFailed(f"a captured step of {static.ids.shape[0]} rows ({rows} real) differs from the same "
                                   f"step run eagerly (max {(replayed - expected).abs().max().item():.3g})", eager)
        self.captures += 1
        log.info("captured a CUDA graph for %d rows (%d graphs)", static.ids.shape[0], len(self._graphs) + 1)
        return graph, static, logits


class GraphCheckFailed(RuntimeError):
    def __init__(self, message: str, logits: torch.Tensor):
        super().__init__(message)
        self.logits = logits
