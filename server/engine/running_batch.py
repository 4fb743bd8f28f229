"""The rows decoding together and their model state: admit (prefill and join), step, retire.

Position p of the batch is row p of the decode state and position p of the adapter row pool, so the pool copies
only adapters that are new at their position: joining rows are ordered to land where their adapter already is,
and when rows leave, rows from the end fill the holes (preferring a hole that holds their adapter) instead of
everything shifting down. A batch whose rows all share one adapter runs on merged weights (or, with merging
off, the shared mode) and does not touch the pool.

Memory: a row's caches may grow to its prompt plus max_new_tokens positions (plus its input for seq2seq), and
padding makes every row as wide as the widest, so `cost` = rows × (widest encoder + widest decoder) positions is
what `max_tokens` bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import arrow_rows, output_step
from .adapter_slots import AdapterSlots
from .decode_state import DecodeState, prefill
from .row_pool import assign_positions
from .sequence import ActiveRow

Row = ActiveRow  # or a BeamRow (beam_rows.py): what the batch needs of both is the same


def cost(rows: Sequence[Row]) -> int:
    """Cache positions the rows may hold at most, padding included."""
    if not rows:
        return 0
    return len(rows) * (max(r.encoder_positions for r in rows) + max(r.decoder_positions for r in rows))


class RunningBatch:
    def __init__(self, model, tokenizer, is_seq2seq: bool, device: torch.device, slots: AdapterSlots, *,
                 eos_ids: frozenset[int], merge_single_task: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.is_seq2seq = is_seq2seq
        self.device = device
        self.slots = slots
        self.eos_ids = eos_ids
        self.merge_single_task = merge_single_task
        self.rows: list[ActiveRow] = []
        self.state: DecodeState | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, joining: list[Row]) -> list[Row]:
        """Prefill the joining rows (adapters already set on them; a beam group's rows all together) and append
        them; return those that ended at their first token."""
        start = len(self.rows)
        tail = self.slots.pool.resident[start: start + len(joining)]
        joining = [joining[i] for i in assign_positions(tail, [row.key for row in joining])]
        self.rows.extend(joining)
        input_ids, attention_mask = self._pad([row.prompt_ids for row in joining])
        recorder = arrow_rows.recorder_for([row.adapter for row in joining], attention_mask)
        self._point_layers(start, len(self.rows), recorder)
        try:
            with torch.inference_mode():
                state, logits = prefill(self.model, self.is_seq2seq, input_ids, attention_mask)
        finally:
            if recorder is not None:
                arrow_rows.stop_recording(self.slots)
        if recorder is not None:
            arrow_rows.record_routing(joining, recorder)
        if self.state is None:
            self.state = state
        else:
            self.state.extend(state)
        return self._take(joining, logits, offset=start)

    def step(self) -> list[Row]:
        """One decoding step for every row; return the rows that ended."""
        self._point_layers(0, len(self.rows))
        last = torch.tensor([row.last_token for row in self.rows], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits = self.state.step(last)  # (N, V)
        return self._take(self.rows, logits)

    def retire(self, leaving: set[Row]) -> None:
        """Drop rows from the batch (and their caches); rows from the end fill the holes."""
        if not leaving:
            return
        order = self._compacted_order(leaving)
        self.rows = [self.rows[i] for i in order]
        if not self.rows:  # nothing running: the layers go back to the bare backbone
            self.state = None
            self.slots.clear()
            return
        self.state.select(order)

    def clear(self) -> None:
        """Forget every row (after a failed forward): the layers go back to the bare backbone."""
        self.rows, self.state = [], None
        self.slots.clear()

    def _take(self, rows: list[Row], logits: torch.Tensor, offset: int = 0) -> list[Row]:
        """The output step for rows [offset, offset + len(rows)) of the batch; beams move their caches."""
        out = output_step.apply(rows, logits, self.eos_ids)
        if out.order is not None:
            order = list(range(offset)) + [offset + p for p in out.order]
            order += list(range(len(order), len(self.rows)))
            with torch.inference_mode():
                self.state.select(order)
        return out.ended

    def _compacted_order(self, leaving: set[Row]) -> list[int]:
        """order[p] = the old position of the row that will sit at position p."""
        staying = [i for i, row in enumerate(self.rows) if row not in leaving]
        size = len(staying)
        holes = [p for p in range(size) if self.rows[p] in leaving]
        movers = [i for i in staying if i >= size]
        order = list(range(size))
        resident = self.slots.pool.resident
        for hole in holes:  # a mover whose adapter sits in the hole already, else the first one
            match = next((i for i in movers if hole < len(resident) and resident[hole] == self.rows[i].key),
                         movers[0])
            movers.remove(match)
            order[hole] = match
        return order

    def _point_layers(self, start: int, end: int, recorder: arrow_rows.RoutingRecorder | None = None) -> None:
        """Layers run rows [start, end) of the batch: merged/shared when every row has one adapter, else the pool;
        Arrow rows among them also route per token (arrow_rows.py)."""
        keys = [row.key for row in self.rows]
        if arrow_rows.point(self.slots, [row.adapter for row in self.rows], keys, start, end, recorder):
            return
        first = self.rows[0]
        if all(key == first.key for key in keys):
            mode = "merged" if self.merge_single_task else "shared"
            if self.slots.applied != (mode, first.key):
                if self.merge_single_task:
                    self.slots.use_merged(first.adapter, first.key)
                else:
                    self.slots.use_shared(first.adapter, first.key)
            return
        if self.slots.applied != ("rows", tuple(keys), start, end):
            self.slots.use_rows([row.adapter for row in self.rows], keys, start, end)

    def _pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists -> ids and mask (M, Q): right-padded for an encoder, left-padded for a causal LM."""
        width = max(len(p) for p in prompts)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            span = slice(0, len(prompt)) if self.is_seq2seq else slice(width - len(prompt), width)
            ids[i, span] = torch.tensor(prompt, dtype=torch.long)
            mask[i, span] = 1
        return ids.to(self.device), mask.to(self.device)
