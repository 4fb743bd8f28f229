"""A submitted generation as the serving loop sees it: the job (one request, its future, cancellation) and
each of its rows while it decodes (tokens so far, text, random stream, why it ended)."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from adapter_store import AdapterKey, TaskAdapter

from .beam_rows import BeamGroup
from .guided import RowGuide
from .row_text import RowText
from .rows import Completion, GenerateRow, SamplingParams, TokenLogprob
from .sampling import row_generator


class GenerateJob:
    """One request's rows. Its future gets the completions in row order once every row has ended, or the
    first error. `cancel()` (a client gone) retires its rows at the loop's next iteration."""

    def __init__(self, rows: Sequence[GenerateRow]):
        self.rows = list(rows)
        self.future: Future[list[Completion]] = Future()
        self.cancelled = threading.Event()
        self.pinned: dict[str, tuple[TaskAdapter, Hashable]] = {}  # task -> the adapter all its rows use
        self._completions: list[Completion | None] = [None] * len(self.rows)
        self._remaining = len(self.rows)

    def cancel(self) -> None:
        self.cancelled.set()

    def finish_row(self, index: int, completion: Completion) -> None:
        self._completions[index] = completion
        self._remaining -= 1
        if self._remaining == 0 and not self.future.done():
            self.future.set_result(list(self._completions))

    def fail(self, exc: BaseException) -> None:
        self.cancelled.set()  # its other rows stop too
        if not self.future.done():
            self.future.set_exception(exc)

    def abandon(self) -> None:
        """The loop dropped the cancelled job's rows: its future ends cancelled."""
        self.future.cancel()

    @property
    def ended(self) -> bool:
        return self.future.done()


class ExplicitKey:
    """The cache key of an adapter given with the rows (e.g. one being trained): unique, never stale."""

    __slots__ = ()


class ActiveRow:
    """One input text from admission to its end."""

    def __init__(self, job: GenerateJob, index: int, tokenizer, prompt_ids: list[int]):
        self.job = job
        self.index = index
        self.row = job.rows[index]
        self.params: SamplingParams = self.row.params
        self.prompt_ids = prompt_ids
        self.text = RowText(tokenizer, self.params.stop)
        self.generator = row_generator(self.params, self.row.index)
        self.tokens: list[int] = []  # generated, end-of-sequence excluded
        self.logprobs: list[TokenLogprob] | None = [] if self.params.logprobs is not None else None
        self.guide = RowGuide(self.params.grammar, tokenizer) if self.params.grammar else None
        self.last_token: int | None = None
        self.finish_reason: str | None = None
        self.adapter: TaskAdapter | None = None
        self.key: Hashable | None = None
        self.kv = None  # its blocks in the KV pool while it runs (paged_kv.RowKV)
        self.admitted = 0  # when it joined the batch (newest rows are preempted first)
        self.routing: dict[str, float] | None = None  # an Arrow row's routing over its prompt (arrow_rows.py)

    @property
    def generated(self) -> int:
        return len(self.tokens)

    @property
    def tokens_left(self) -> int:
        """Decoding steps it may still run (fewer where it ends early)."""
        return self.params.max_new_tokens - len(self.tokens)

    def accept(self, token: int, eos_ids: frozenset[int], logprob: TokenLogprob | None = None) -> bool:
        """Take the next token (and its log-probability entry, kept when the row asked for them, an end of sequence
        included); True when the row has ended (end of sequence, its limit, a stop string)."""
        self.last_token = token
        if self.guide is not None:
            self.guide.accept(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if token in eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            return True
        self.tokens.append(token)
        tracks_text = bool(self.params.stop) or self.row.on_text is not None  # else decoded once, at the end
        if tracks_text and self.text.add(token):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def stream(self) -> None:
        """Hand the streaming callback what text can no longer change."""
        if self.row.on_text is not None:
            piece = self.text.streamable()
            if piece:
                self.row.on_text(piece)

    def finish(self) -> None:
        """Answer this row of its request (after it left the batch)."""
        self.job.finish_row(self.index, self.completion())

    def completion(self) -> Completion:
        version = self.key.version if isinstance(self.key, AdapterKey) else None
        return Completion(self.text.final_text(self.tokens), len(self.prompt_ids), len(self.tokens),
                          self.finish_reason or "cancelled", version, self.logprobs, self.routing)


@dataclass
class WaitingRow:
    """A submitted row not yet running: job.rows[index]."""

    job: GenerateJob
    index: int
    arrived: float = field(default_factory=time.monotonic)
    started: list | None = None  # once tokenised: its batch rows (one ActiveRow, or a beam group's k BeamRows)

    @property
    def row(self) -> GenerateRow:
        return self.job.rows[self.index]


class RowMaker:
    """A waiting row -> its rows in the running batch: one ActiveRow, or a beam search's k BeamRows."""

    def __init__(self, tokenizer, eos_ids: frozenset[int], max_rows: int):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_rows = max_rows

    def __call__(self, entry: WaitingRow) -> list:
        row = entry.row
        ids = row.prompt_ids or self.tokenizer(row.text)["input_ids"]
        beams = row.params.num_beams
        if beams == 1:
            return [ActiveRow(entry.job, entry.index, self.tokenizer, ids)]
        if beams > self.max_rows:
            raise ValueError(f"num_beams: {beams} beams do not fit a batch of max_batch_size={self.max_rows} rows")
        return BeamGroup(entry.job, entry.index, self.tokenizer, ids, self.eos_ids).rows
