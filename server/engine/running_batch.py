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

from .adapter_slots import AdapterSlots
from .decode_state import DecodeState, prefill
from .row_pool import assign_positions
from .sampling import choose
from .sequence import ActiveRow


def cost(rows: Sequence[ActiveRow]) -> int:
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

    def admit(self, joining: list[ActiveRow]) -> list[ActiveRow]:
        """Prefill the joining rows (adapters already set on them) and append them; return those that ended at
        their first token."""
        start = len(self.rows)
        tail = self.slots.pool.resident[start: start + len(joining)]
        joining = [joining[i] for i in assign_positions(tail, [row.key for row in joining])]
        self.rows.extend(joining)
        self._point_layers(start, len(self.rows))
        input_ids, attention_mask = self._pad([row.prompt_ids for row in joining])
        with torch.inference_mode():
            state, logits = prefill(self.model, self.is_seq2seq, input_ids, attention_mask)
        if self.state is None:
            self.state = state
        else:
            self.state.extend(state)
        return self._take(joining, logits)

    def step(self) -> list[ActiveRow]:
        """One decoding step for every row; return the rows that ended."""
        self._point_layers(0, len(self.rows))
        last = torch.tensor([row.last_token for row in self.rows], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            logits = self.state.step(last)  # (N, V)
        return self._take(self.rows, logits)

    def retire(self, leaving: set[ActiveRow]) -> None:
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

    def _take(self, rows: list[ActiveRow], logits: torch.Tensor) -> list[ActiveRow]:
        with torch.inference_mode():
            tokens, logprobs = choose(logits, rows, self.eos_ids)
        ended = []
        for row, token, logprob in zip(rows, tokens.tolist(), logprobs, strict=True):
            if row.accept(token, self.eos_ids, logprob):
                ended.append(row)
            else:
                row.stream()
        return ended

    def _compacted_order(self, leaving: set[ActiveRow]) -> list[int]:
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

    def _point_layers(self, start: int, end: int) -> None:
        """Layers run rows [start, end) of the batch: merged/shared when every row has one adapter, else the pool."""
        keys = [row.key for row in self.rows]
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
