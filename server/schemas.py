"""Request and response bodies of the HTTP API (strict: wrong types and unknown fields are refused)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from .adapt.states import JobState

NonEmptyText = Annotated[str, StringConstraints(min_length=1, max_length=100_000)]
TaskName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateRequest(StrictModel):
    task: TaskName = Field(description="a task name from GET /tasks, or __mu__ for the μ adapter")
    inputs: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)]
    max_new_tokens: int | None = Field(None, ge=1, description="default: the server's default_max_new_tokens")
    min_new_tokens: int = Field(0, ge=0, description="end of sequence is not allowed before this many new tokens")
    ignore_eos: bool = Field(False, description="keep generating after an end of sequence, up to max_new_tokens")
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=100_000, description="0: no top-k filter")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="makes sampling reproducible")
    num_beams: int = Field(1, ge=1)
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(default_factory=list,
                                                                                         max_length=16)
    stream: bool = Field(False, description="server-sent events: one `data:` per new piece of text, then `done`")


class Output(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    task: str
    version: int = Field(description="the version of the task's adapter that generated these outputs")
    outputs: list[Output]
    usage: Usage


class ScoreRequest(StrictModel):
    task: TaskName
    inputs: NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)]
    choices: (Annotated[list[NonEmptyText], Field(min_length=1)]
              | Annotated[list[Annotated[list[NonEmptyText], Field(min_length=1)]], Field(min_length=1)]) = Field(
        description="the same choices for every input, or one list of choices per input")


class ChoiceScore(BaseModel):
    choice: str
    logprob_sum: float
    logprob_mean: float
    tokens: int


class ScoreResult(BaseModel):
    scores: list[ChoiceScore]
    best: str = Field(description="the choice with the highest summed log-likelihood")
    best_index: int
    best_by_mean_index: int = Field(description="the highest per-token mean (length-normalised)")


class ScoreResponse(BaseModel):
    task: str
    version: int = Field(description="the version of the task's adapter that scored the choices")
    results: list[ScoreResult]


class TaskOut(BaseModel):
    name: str
    kind: Literal["pretrained", "adapted", "mu"]
    version: int
    method: str
    row: int | None = None
    created: float | None = None


class TaskList(BaseModel):
    tasks: list[TaskOut]


class ErrorBody(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_body(type_: str, message: str, field: str | None = None) -> dict:
    """The body of every error the server sends: {"error": {"type", "message", "field"}}."""
    return ErrorResponse(error=ErrorBody(type=type_, message=message, field=field)).model_dump()


class ExampleIn(StrictModel):
    input: NonEmptyText
    target: Annotated[str, StringConstraints(max_length=100_000)] = Field(
        description="may be empty (the target is then just the end of sequence)")


class AdaptRequest(StrictModel):
    task: TaskName = Field(description="the new task's name: [A-Za-z0-9._-]{1,64}, not starting with '.'")
    examples: Annotated[list[ExampleIn], Field(min_length=1)]
    method: Literal["mhr-z", "poly-z", "mhr-mu"] = Field("mhr-z", description="what is trained (see README)")
    steps: int = Field(200, ge=1)
    learning_rate: float | None = Field(None, gt=0, le=10, description="default: 0.1 for z methods, 1e-3 for mhr-mu")
    batch_size: int = Field(8, ge=1, le=256)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    validation_fraction: float = Field(0.0, ge=0, le=0.5, description="held out for validation loss / exact match")
    overwrite: bool = Field(False, description="replace an adapted task of this name (its version goes up)")


class AdaptJobOut(BaseModel):
    id: str
    task: str
    method: str
    state: JobState
    step: int
    steps: int
    examples: int
    loss: float | None
    validation_loss: float | None
    validation_exact_match: float | None
    trainable_parameters: int | None
    elapsed_s: float | None
    eta_s: float | None
    created: float
    started: float | None
    finished: float | None
    version: int | None
    stopped_early: str | None
    error: str | None
    cancel_requested: bool = False


class AdaptJobList(BaseModel):
    jobs: list[AdaptJobOut]
