"""A beam-search request inside the serving loop: its k beams are k rows of the running batch, decoding beside every
other row; the first beam prefills the prompt and the others share its blocks (RunningBatch.admit). After each step
the group's search (beam_search.py) names each beam's parent; the running batch then moves the caches to follow
(`reorder`).

    group = BeamGroup(job, index, tokenizer, prompt_ids, eos_ids)     group.rows: k BeamRows
    step  = group.advance(log_probs)      (k, V) of its rows -> parents and tokens; group.search.done at the end
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from adapter_store import TaskAdapter

from .beam_search import BeamSearch, BeamStep
from .row_text import cut_at_stop
from .rows import Completion


class BeamRow:
    """One beam: a row of the running batch whose token is chosen by its group."""

    def __init__(self, group: BeamGroup, beam: int):
        self.group = group
        self.beam = beam
        self.job = group.job
        self.index = group.index
        self.prompt_ids = group.prompt_ids
        self.last_token: int | None = None
        self.adapter: TaskAdapter | None = None
        self.key: Hashable | None = None
        self.kv = None  # its blocks in the KV pool while it runs (paged_kv.RowKV)
        self.admitted = 0  # when it joined the batch (newest rows are preempted first)

    @property
    def tokens_left(self) -> int:
        """Decoding steps it may still run (fewer where its search ends early)."""
        return self.group.params.max_new_tokens - self.group.search.generated

    def finish(self) -> None:
        self.group.finish()


class BeamGroup:
    def __init__(self, job, index: int, tokenizer, prompt_ids: list[int], eos_ids: frozenset[int]):
        self.job = job
        self.index = index
        self.row = job.rows[index]
        self.params = self.row.params
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.eos_ids = eos_ids
        self.search = BeamSearch(self.params.num_beams, self.params.max_new_tokens, eos_ids)
        self.rows = [BeamRow(self, beam) for beam in range(self.params.num_beams)]
        self._answered = False

    def advance(self, logits: torch.Tensor) -> BeamStep:
        """logits (k, V) of the group's rows in beam order -> the next step's parents and tokens (set on the rows)."""
        log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()  # (k, V): the search keeps its books on the host
        if self.eos_ids and (self.params.ignore_eos or self.search.generated < self.params.min_new_tokens):
            log_probs[:, sorted(self.eos_ids)] = -float("inf")  # as generate's min-new-tokens processor
        step = self.search.step(log_probs)
        for row, token in zip(self.rows, step.tokens, strict=True):
            row.last_token = token
        return step

    def restart(self) -> None:
        """Start the search over (its rows were preempted: their caches are gone)."""
        self.search = BeamSearch(self.params.num_beams, self.params.max_new_tokens, self.eos_ids)
        for row in self.rows:
            row.last_token = None

    @property
    def done(self) -> bool:
        return self.search.done

    def finish(self) -> None:
        """Answer the request's row once (its k rows end together)."""
        if self._answered:
            return
        self._answered = True
        self.job.finish_row(self.index, self.completion())

    def completion(self) -> Completion:
        tokens, ended_by_eos = self.search.best()
        text, stopped = cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), self.params.stop)
        version = getattr(self.rows[0].key, "version", None)
        finish = "stop" if ended_by_eos or stopped else "length" if self.done else "cancelled"
        routing = getattr(self.rows[0], "routing", None)  # an Arrow row's, recorded at its prefill
        return Completion(text, len(self.prompt_ids), len(tokens), finish, version, routing=routing)
