"""Typed response bodies of the mhr-serve HTTP API.

The field names mirror ``server/schemas.py`` (copied, not imported: the client never needs the server).
Unknown fields are ignored and enumerations are plain strings, so a newer server does not break an older client.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

#: Adaptation job states; the last three are final.
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class TopToken(Model):
    token: str  # its decoded text (a byte-level tokenizer's partial character: the tokenizer's own token)
    id: int
    logprob: float


class TokenLogprob(TopToken):
    """A generated token, its log-probability, and the most likely tokens at its position (best first)."""

    top: list[TopToken]


class Output(Model):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    logprobs: list[TokenLogprob] | None = None  # with generate(logprobs=k): one per generated token


class Usage(Model):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(Model):
    task: str  # the task's name, or a mix's canonical name: "mix(a=0.7,b=0.3)"
    version: int | None  # None for a mix
    outputs: list[Output]
    usage: Usage
    routing: dict[str, float] | None = None  # an Arrow route: each skill's (task's) mean routing weight

    @property
    def texts(self) -> list[str]:
        return [output.text for output in self.outputs]


class StreamEvent(Model):
    """One server-sent event of ``stream()``: a new piece ``text`` of output ``index``.

    The last event has ``response`` set (the whole GenerateResponse), ``index=None`` and ``text=""``.
    """

    index: int | None = None
    text: str = ""
    response: GenerateResponse | None = None

    @property
    def done(self) -> bool:
        return self.response is not None


class ChoiceScore(Model):
    choice: str
    logprob_sum: float
    logprob_mean: float
    tokens: int


class ScoreResult(Model):
    scores: list[ChoiceScore]
    best: str
    best_index: int
    best_by_mean_index: int


class ScoreResponse(Model):
    task: str  # the task's name, or a mix's canonical name: "mix(a=0.7,b=0.3)"
    version: int | None  # None for a mix
    results: list[ScoreResult]
    routing: dict[str, float] | None = None  # an Arrow route: each skill's (task's) mean routing weight


class TaskInfo(Model):
    name: str
    kind: str  # "pretrained" | "adapted" | "composed" | "mu" | "base" | "broken"
    version: int
    method: str
    row: int | None = None
    created: float | None = None
    mix: dict[str, float] | None = None  # a composed task's recipe: its tasks and their normalised weights
    route: dict | None = None  # a named Arrow task's route: {"over", "top_k", "temperature"}
    reason: str | None = None  # a broken task's: its file on the server and what is wrong with it

    @property
    def broken(self) -> bool:
        """True for a task whose file on the server cannot be served (see ``reason``)."""
        return self.kind == "broken"


class AdaptJob(Model):
    id: str
    task: str
    method: str
    state: str  # one of JOB_STATES
    step: int
    steps: int
    examples: int
    loss: float | None = None
    validation_loss: float | None = None
    validation_exact_match: float | None = None
    trainable_parameters: int | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    created: float
    started: float | None = None
    finished: float | None = None
    version: int | None = None
    stopped_early: str | None = None
    error: str | None = None
    cancel_requested: bool = False  # a running job asked to stop: it reads "running" until its next step
    result: dict | None = None  # retrieval's: {"mix": {task: weight}, "candidates": [{task, loss, weight}, ...]}

    @property
    def done(self) -> bool:
        """True once the job is succeeded, failed or cancelled."""
        return self.state in FINAL_STATES

    @property
    def mix(self) -> dict[str, float] | None:
        """The retrieved mix {task: weight} (method "retrieve", or ``init="retrieve"``); None before or without one."""
        return None if self.result is None else self.result.get("mix")


class BrokenTaskInfo(Model):
    """A task /readyz reports broken: its file on the server and why."""

    name: str
    file: str
    reason: str


class Readiness(Model):
    """GET /readyz: ``status`` is "ready" (with the other fields) or "loading"."""

    status: str
    inventory: str | None = None
    tasks: int | None = None
    broken_tasks: list[BrokenTaskInfo] = []  # files in the adapted folder that cannot be served
    device: str | None = None
    dtype: str | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"
