"""What the engine is asked to do and what it answers, one row per input text (an HTTP request with a
list of inputs becomes one row per input)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from adapter_store import TaskAdapter, TaskRef


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    min_new_tokens: int = 0  # end-of-sequence is forbidden before this many new tokens
    ignore_eos: bool = False  # end-of-sequence does not end the row (it runs to max_new_tokens)
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: each chosen token's log-probability and the k most likely
    grammar: str | None = None  # llguidance's grammar (guided.py): only tokens it allows are chosen

    def beam_key(self) -> tuple:
        """Beam-search rows may share one search only when this key is equal (results depend on the limit)."""
        return (self.num_beams, self.max_new_tokens, self.min_new_tokens)


@dataclass
class GenerateRow:
    task: TaskRef  # a task's name, or a Mix
    text: str
    params: SamplingParams
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text
    adapter: TaskAdapter | None = None  # an explicit adapter (e.g. one being trained) instead of the task's
    index: int = 0  # position in its request: seeded rows of one request draw different streams
    prompt_ids: list[int] | None = None  # already tokenised (e.g. a rendered chat template); else `text` is


@dataclass(frozen=True)
class TokenLogprob:
    """One position of a sequence: its token, that token's log-probability under the model (log_softmax of the
    raw logits, before temperature / top-k / top-p), and the most likely tokens there, best first."""

    token: int
    logprob: float | None  # None: no prediction for this position (a causal prompt's first token, an encoder input)
    top: tuple[tuple[int, float], ...] = ()  # (token, log-probability), descending


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length" | "cancelled"
    version: int | None = None  # the version of the task's adapter that produced it
    logprobs: list[TokenLogprob] | None = None  # params.logprobs set: one per generated token, a final EOS included
    routing: dict[str, float] | None = None  # Arrow rows: each expert's mean weight over the prompt's tokens and layers


@dataclass
class ScoreRow:
    task: TaskRef
    text: str
    choices: list[str] = field(default_factory=list)


@dataclass
class ChoiceLogprob:
    """The log-likelihood of one choice given its row's input."""

    choice: str
    logprob_sum: float
    logprob_mean: float
    tokens: int
