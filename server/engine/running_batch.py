"""The rows decoding together: admit (prefill and join), step, retire — their keys and values in the KV pool
(paged_kv.py), their adapters in the row pool.

Position p of the batch is position p of the adapter row pool, so the pool copies only adapters that are new at
their position: joining rows are ordered to land where their adapter already is, and when rows leave, rows from the
end fill the holes (preferring a hole that holds their adapter) instead of everything shifting down. A batch whose
rows all share one adapter runs on merged weights (or, with merging off, the shared mode) and does not touch the
pool. A row's place in the batch says nothing about its KV: that lives in its own blocks.

When the KV pool cannot give every row its next block, the newest rows are preempted (`preempted`, for the
scheduler to queue again at the front): their blocks are freed, and when they join again their prompt and the
tokens they had are computed again (a beam search starts over) — they are answered later, never failed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from adapter_store import BASE_TASK

from . import arrow_rows, output_step
from .adapter_slots import AdapterSlots
from .beam_rows import BeamRow
from .paged_kv import PagedKV
from .row_pool import assign_positions
from .sequence import ActiveRow
from .static_step import row_bucket

Row = ActiveRow | BeamRow  # what the batch needs of both is the same: job, index, key, adapter, last_token, kv


class RunningBatch:
    def __init__(self, kv: PagedKV, slots: AdapterSlots, *, eos_ids: frozenset[int], merge_single_task: bool,
                 decoder_start: int | None, prefill_chunk: int | None = None):
        """decoder_start: a seq2seq model's decoder start token (None for a causal LM). prefill_chunk: a causal LM's
        prompt longer than this is prefilled this many tokens per iteration, so the running rows keep decoding
        between its chunks (None: at once)."""
        self.kv = kv
        self.route_prompts: Callable[[list[Row]], None] | None = None  # rows routed once from their prompt get their
        # fixed adapter before their prefill (Engine: arrow_prompt.route_rows)
        self.slots = slots
        self.eos_ids = eos_ids
        self.merge_single_task = merge_single_task
        self.decoder_start = decoder_start
        self.rows: list[Row] = []
        self.prefill_chunk = prefill_chunk
        self.prefilling: list[Row] = []  # admitted rows whose long prompts are still being prefilled, oldest first
        self.preempted: list[Row] = []  # rows the last step had to preempt (the scheduler queues them again)
        self.outgrown: list[Row] = []  # rows the last step found could never fit the pool (the scheduler fails them)
        self.preemptions = 0
        self._admitted = itertools.count()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def occupied(self) -> int:
        """Rows admitted: decoding, or still prefilling a long prompt."""
        return len(self.rows) + len(self.prefilling)

    def blocks_to_join(self, row: Row) -> int:
        """KV blocks a waiting row takes when it joins (before prefix-cache hits); a beam after its group's first
        takes none: it shares the first's (`admit`)."""
        if _follows(row):
            return 0
        sequence, inputs = self._prefill_tokens(row)
        return self.kv.blocks_needed(len(sequence), len(inputs or ()))

    def admit(self, joining: list[Row]) -> list[Row]:
        """Prefill the joining rows (adapters already set on them; a beam group's rows all together) and append
        them; return those that ended at their first token. T5 rows whose encoder output is cached (same adapter,
        same input) are prefilled in a forward of their own, after the others, with no encoder. A beam search's
        prompt is prefilled once, by its first beam: the others share its blocks (copied when they next write) and
        its logits (the search continues only the first beam at its first step: beam_search.py)."""
        for row in joining:
            row.admitted = next(self._admitted)
        if self.route_prompts is not None:
            self.route_prompts(joining)
        joining = self._defer_long_prompts(joining)
        if not joining:
            return []
        start = len(self.rows)
        followers = [row for row in joining if _follows(row)]
        parts = []
        for part in self._join_parts([row for row in joining if not _follows(row)]):
            tail = self.slots.pool.resident[len(self.rows): len(self.rows) + len(part)]
            part = [part[i] for i in assign_positions(tail, [row.key for row in part])]
            parts.append((len(self.rows), part))
            self.rows.extend(part)
        self.rows.extend(followers)  # after the prefilled rows, which keep one run of positions
        try:
            prefilled = [(part, self._prefill(part, first)) for first, part in parts]
        except MemoryError:  # the pool cannot hold them: they leave again (the caller fails their requests)
            self.retire(set(self.rows[start:]))
            raise
        return [row for part, logits in prefilled if logits is not None
                for row in self._take(*self._with_followers(part, logits, followers))]

    def _with_followers(self, part: list[Row], logits: torch.Tensor, followers: list[Row]
                        ) -> tuple[list[Row], torch.Tensor]:
        """A prefilled part and its rows' logits (M, V), with the followers of its beam groups appended: each holds
        its group's first beam's blocks (shared) and takes its logits."""
        first = {row.group: i for i, row in enumerate(part) if isinstance(row, BeamRow)}
        mine = [row for row in followers if row.group in first]
        if not mine:
            return part, logits
        self.kv.follow(mine, [part[first[row.group]] for row in mine])
        leaders = torch.tensor([first[row.group] for row in mine], device=logits.device)
        return part + mine, torch.cat([logits, logits[leaders]])  # (M + F, V)

    def _join_parts(self, joining: list[Row]) -> list[list[Row]]:
        """The joining rows in the forwards they join by, without empty parts: T5 rows whose encoder output the KV
        pool holds (Arrow rows always encoded) apart from the rows to encode, and in each, the rows that start
        decoding from the start token (`_starts_decoding`) apart from the others; [joining] for a causal LM."""
        if self.decoder_start is None:
            return [joining]
        reused = {id(row) for row in joining if not arrow_rows.is_arrow(row.adapter)
                  and self.kv.reuse_encoder(row, row.prompt_ids)}
        parts = [[row for row in joining if (id(row) in reused) == cached and self._starts_decoding(row) == starts]
                 for cached in (False, True) for starts in (True, False)]
        return [part for part in parts if part]

    def _starts_decoding(self, row: Row) -> bool:
        """A T5 row that joins with its encoder only (PagedKV.encode): its first decoding step, beside the running
        rows, runs the start token. Not a beam, an Arrow row (routing per token records the decoder's start token),
        or a preempted row that computes the tokens it had again."""
        return isinstance(row, ActiveRow) and not row.tokens and not arrow_rows.is_arrow(row.adapter)

    def _prefill(self, rows: list[Row], first: int) -> torch.Tensor | None:
        """Prefill rows at batch positions [first, first + len(rows)) -> their logits (M, V); None for T5 rows that
        start decoding from the start token (nothing sampled yet)."""
        tokens = [self._prefill_tokens(row) for row in rows]
        inputs = [x for _, x in tokens] if self.decoder_start is not None else None
        recorders: list[arrow_rows.RoutingRecorder] = []

        def point(prompt_mask: torch.Tensor) -> None:  # the prefill's layout known: Arrow rows record their routing
            recorder = arrow_rows.recorder_for([row.adapter for row in rows], prompt_mask)
            if recorder is not None:
                recorders.append(recorder)
            self._point_layers(first, first + len(rows), recorder)

        if inputs is not None and self._starts_decoding(rows[0]):  # its part: all of them
            self.kv.encode(rows, inputs, before_forward=point)
            for row in rows:
                row.last_token = self.decoder_start
            return None
        try:
            logits = self.kv.prefill(rows, [seq for seq, _ in tokens], inputs, before_forward=point)
        finally:
            if recorders:
                arrow_rows.stop_recording(self.slots)
        if recorders:
            arrow_rows.record_routing(rows, recorders[0])
        return logits

    def _defer_long_prompts(self, joining: list[Row]) -> list[Row]:
        """Rows whose prompts are prefilled in chunks, and rows whose first prompt block repeats an earlier joining
        row's while the prefix cache does not hold it yet (they prefill after that row, from its blocks: a system
        prompt shared by requests that arrive together is computed once), get their blocks now and wait in
        `prefilling`; return the others."""
        first_blocks: set[int] = set()
        long = []
        for row in joining:
            first = self._first_block(row)
            if self._chunked(row) or first in first_blocks:
                long.append(row)
            elif first is not None:
                first_blocks.add(first)
        try:
            for row in long:
                self.kv.place(row, self._prefill_tokens(row)[0])
        except MemoryError:
            for row in long:
                self.kv.release(row)
            raise
        self.prefilling += long
        return [row for row in joining if row not in long]

    def _prefilled_alone(self, row: Row) -> bool:
        """May this row prefill in `prefilling` (a forward of its own, its adapter alone)?"""
        return self.decoder_start is None and isinstance(row, ActiveRow) and not arrow_rows.is_arrow(row.adapter)

    def _chunked(self, row: Row) -> bool:
        return (self.prefill_chunk is not None and self._prefilled_alone(row)
                and len(self._prefill_tokens(row)[0]) > self.prefill_chunk)

    def _first_block(self, row: Row) -> int | None:
        """The hash of the row's first prompt block where it is full and not cached (else None)."""
        return self.kv.uncached_first_block(row, self._prefill_tokens(row)[0]) if self._prefilled_alone(row) else None

    def advance_prefill(self) -> list[Row]:
        """The next chunk of the oldest waiting prompt, and with it the prompts behind it whose remaining tokens fit
        the same chunk (those a shared prefix left short), in a forward of their own, each row with its own adapter
        (the running rows' layers are pointed again at their next step). Rows whose prompts are complete join the
        running rows; return the rows that ended at their first token."""
        if not self.prefilling:
            return []
        taking, sequences = self._next_prefills()
        with self.slots.activate([row.adapter for row in taking], key=taking[0].key):
            logits = self.kv.prefill(taking, sequences, limit=self.prefill_chunk)
        done = [i for i, (row, seq) in enumerate(zip(taking, sequences, strict=True)) if row.kv.length == len(seq)]
        if not done:
            return []
        joining = [taking[i] for i in done]
        ids = {id(row) for row in joining}
        self.prefilling = [row for row in self.prefilling if id(row) not in ids]
        self.rows.extend(joining)
        return self._take(joining, logits[done])

    def _next_prefills(self) -> tuple[list[Row], list[list[int]]]:
        """The oldest prompt, then those after it while their tokens still to compute (after taking what the prefix
        cache holds by now) fit one chunk together."""
        budget = self.prefill_chunk or sum(len(self._prefill_tokens(row)[0]) for row in self.prefilling)
        taking, sequences, spent = [], [], 0
        for row in self.prefilling:
            sequence = self._prefill_tokens(row)[0]
            self.kv.place_again(row, sequence)  # a prompt shared with a row prefilled before it: that row's blocks
            spent += len(sequence) - row.kv.length
            if taking and spent > budget:
                break
            taking.append(row)
            sequences.append(sequence)
        return taking, sequences

    def step(self) -> list[Row]:
        """One decoding step for every row; return the rows that ended (`preempted` says who had to leave)."""
        self.preempted = self._preempt(self.kv.make_room(sorted(self.rows, key=lambda r: r.admitted)))
        self.outgrown = self._outgrown()
        if not self.rows:
            return []
        static = self._static_width()
        self._point_layers(0, len(self.rows), width=static)
        logits = self.kv.decode(self.rows, [row.last_token for row in self.rows], static_width=static)  # (N, V)
        return self._take(self.rows, logits)

    def _static_width(self) -> int | None:
        """The rows the static-shaped step runs (its bucket), where one is configured and takes this batch: not
        with Arrow rows (their per-token routing depends on the batch's own layout)."""
        if self.kv.static is None or any(arrow_rows.is_arrow(row.adapter) for row in self.rows):
            return None
        return min(row_bucket(len(self.rows)), self.slots.pool.max_rows)

    def retire(self, leaving: set[Row]) -> None:
        """Drop rows from the batch and free their blocks; rows from the end fill the holes."""
        if not leaving:
            return
        for row in leaving:
            self.kv.release(row)
        self.prefilling = [row for row in self.prefilling if row not in leaving]
        leaving = {row for row in leaving if row in self.rows}
        if not leaving:
            return
        order = self._compacted_order(leaving)
        self.rows = [self.rows[i] for i in order]
        if not self.rows:  # nothing running: the layers go back to the bare backbone
            self.slots.clear()

    def clear(self) -> None:
        """Forget every row (after a failed forward): blocks freed, the layers back to the bare backbone."""
        for row in [*self.rows, *self.prefilling]:
            self.kv.release(row)
        self.rows, self.prefilling = [], []
        self.slots.clear()

    def _prefill_tokens(self, row: Row) -> tuple[list[int], list[int] | None]:
        """What a joining row computes: (decoder or causal tokens, encoder tokens for seq2seq). A row preempted
        earlier computes the tokens it had generated again."""
        generated = row.tokens if isinstance(row, ActiveRow) else []
        if self.decoder_start is None:
            return row.prompt_ids + generated, None
        return [self.decoder_start, *generated], row.prompt_ids

    def _preempt(self, victims: list[Row]) -> list[Row]:
        """Take preempted rows out of the batch (a beam search leaves with all its beams, and starts over)."""
        if not victims:
            return []
        leaving = set(victims)
        for row in victims:
            if isinstance(row, BeamRow):
                leaving.update(row.group.rows)
                row.group.restart()
        self.retire(leaving)
        self.preemptions += len(leaving)
        return sorted(leaving, key=lambda r: r.admitted)

    def _outgrown(self) -> list[Row]:
        """When every row had to leave and no prompt holds blocks while it prefills, the oldest row (with its whole
        beam search) could not take its next block even alone: it never will. It leaves `preempted`."""
        if not self.preempted or self.rows or self.prefilling:
            return []
        oldest = self.preempted[0]
        rows = oldest.group.rows if isinstance(oldest, BeamRow) else [oldest]
        self.preempted = [row for row in self.preempted if row not in rows]
        return list(rows)

    def _take(self, rows: list[Row], logits: torch.Tensor) -> list[Row]:
        """The output step for rows that ran (in batch order); beams follow their parents."""
        out = output_step.apply(rows, logits, self.eos_ids)
        if out.order is not None:
            moved = [(rows[p], rows[parent]) for p, parent in enumerate(out.order) if parent != p]
            self.kv.follow([row for row, _ in moved], [parent for _, parent in moved])
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

    def _point_layers(self, start: int, end: int, recorder: arrow_rows.RoutingRecorder | None = None, *,
                      width: int | None = None) -> None:
        """Layers run rows [start, end) of the batch: merged/shared when every row has one adapter, else the pool;
        Arrow rows among them also route per token (arrow_rows.py). width: the pool's rows [start, width) instead
        (the static step's padded rows)."""
        keys = [row.key for row in self.rows]
        if arrow_rows.point(self.slots, [row.adapter for row in self.rows], keys, start, end, recorder):
            return
        first = self.rows[0]
        if all(key == first.key for key in keys) and getattr(first.key, "task", None) == BASE_TASK:
            if self.slots.applied != ("base",):  # the backbone alone: no adapter work at all
                self.slots.clear()
                self.slots.applied = ("base",)
            return
        if all(key == first.key for key in keys):
            if self.merge_single_task and self.slots.merge_pays(first.key, sum(row.tokens_left for row in self.rows)):
                if self.slots.applied != ("merged", first.key):
                    self.slots.use_merged(first.adapter, first.key)
            else:
                self.slots.ran_unmerged(first.key, len(self.rows))
                if self.slots.applied != ("shared", first.key, width is not None):  # static step: in place
                    self.slots.use_shared(first.adapter, first.key, in_place=width is not None)
            return
        if self.slots.applied != ("rows", tuple(keys), start, width or end):
            self.slots.use_rows([row.adapter for row in self.rows], keys, start, width or end)


def _follows(row: Row) -> bool:
    """A beam after its group's first: it joins on the first's prefill (RunningBatch.admit)."""
    return isinstance(row, BeamRow) and row.beam > 0
