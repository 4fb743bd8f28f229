"""What the engine is asked to do, one row per input text (requests are split into rows by the batcher)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_beams: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def batch_key(self) -> tuple:
        """Rows may share a generate() call only when this key is equal.

        Greedy rows share regardless of length (a greedy prefix does not depend on the limit); beam
        search results depend on the length limit; seeded sampling gets a call of its own.
        """
        if self.num_beams > 1:
            return ("beam", self.num_beams, self.max_new_tokens)
        if self.do_sample:
            return ("sample", self.temperature, self.top_p, self.top_k, self.seed)
        return ("greedy",)


@dataclass
class GenerateRow:
    task: str
    text: str
    params: SamplingParams
    on_text: Callable[[str], None] | None = None  # streaming: called with each new piece of text


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length"


@dataclass
class ScoreRow:
    task: str
    text: str
    choices: list[str] = field(default_factory=list)


@dataclass
class ChoiceScore:
    choice: str
    logprob_sum: float
    logprob_mean: float
    tokens: int
