"""Request and response bodies of the HTTP API (strict: wrong types and unknown fields are refused)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from .adapt.states import JobState

NonEmptyText = Annotated[str, StringConstraints(min_length=1, max_length=100_000)]
TaskName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MixSpec(StrictModel):
    mix: dict[TaskName, float] = Field(
        description="tasks and their weights (≥ 0, normalised to sum 1): served with the weighted sum of the tasks' "
        "normalised skill weights, per layer and head; __mu__ allowed, plain-LoRA (MHR-μ) tasks are not",
        examples=[{"reverse-upper": 0.7, "shift-double": 0.3}])


class ArrowRoute(StrictModel):
    route: Literal["arrow"] = Field(description="zero-shot: no task, no examples; each token of each adapted layer "
                                    "is routed over a library of LoRAs by Arrow (Ostapenko et al. 2024)")
    over: str = Field("skills", description="skills: the inventory's K skills as the library; tasks: every "
                      "pretrained and adapted task's LoRA", examples=["skills", "tasks"])
    top_k: int | None = Field(4, description="≥ 1 and at most the library's size: each token keeps its top_k "
                              "experts (null: all)")
    temperature: float = Field(1.0, description="> 0: softmax(|x·prototype| / temperature) over the kept experts")
    granularity: str = Field("token", description="token: every token is routed, per layer; prompt: each layer's "
                             "mix is fixed once per request from the prompt's tokens (their mean |x·prototype|) and "
                             "applied to every token, prompt and generated", examples=["token", "prompt"])


TaskOrMix = TaskName | MixSpec | ArrowRoute


class GuidedSpec(StrictModel):
    """Exactly one of the three: the output must follow it (llguidance; see README, Structured output)."""

    json_schema: dict[str, Any] | None = Field(None, description="a JSON schema the output validates against")
    regex: Annotated[str, StringConstraints(min_length=1, max_length=10_000)] | None = Field(
        None, description="a regular expression the whole output matches (Rust regex syntax)")
    choice: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=1000)]],
                      Field(min_length=1, max_length=256)] | None = Field(None, description="one of these strings")

    @model_validator(mode="after")
    def _exactly_one(self) -> GuidedSpec:
        if sum(v is not None for v in (self.json_schema, self.regex, self.choice)) != 1:
            raise ValueError("give exactly one of json_schema, regex, choice")
        return self


class GenerateRequest(StrictModel):
    task: TaskOrMix = Field(description="a task name from GET /tasks (__mu__: the μ adapter), {\"mix\": {...}}, or "
                            "{\"route\": \"arrow\", ...}")
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
    logprobs: int | None = Field(None, ge=0, le=20, description="each generated token's log-probability and the k "
                                 "most likely tokens at its position (not with num_beams > 1 or stream)")
    guided: GuidedSpec | None = Field(None, description="structured output: a JSON schema, a regex or a list of "
                                      "choices the output follows (not with num_beams > 1, min_new_tokens, ignore_eos)")


class TopToken(BaseModel):
    token: str = Field(description="the token's decoded text (a byte-level tokenizer's partial character: the "
                       "tokenizer's own token)")
    id: int
    logprob: float


class TokenLogprobOut(TopToken):
    top: list[TopToken] = Field(description="the k most likely tokens at this position, best first")


class Output(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    logprobs: list[TokenLogprobOut] | None = Field(None, description="with logprobs: one entry per generated token "
                                                   "(log_softmax of the model's raw logits, as vLLM's)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    task: str = Field(description="the task's name, or the mix's canonical name: mix(a=0.7,b=0.3)")
    version: int | None = Field(description="the version of the task's adapter that generated these outputs "
                                "(null for a mix)")
    outputs: list[Output]
    usage: Usage
    routing: dict[str, float] | None = Field(None, description="an Arrow route: each skill's (or task's) routing "
                                             "weight averaged over the prompts' tokens, then layers and inputs")


class ScoreRequest(StrictModel):
    task: TaskOrMix
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
    version: int | None = Field(description="the version of the task's adapter that scored the choices (null for "
                                "a mix)")
    results: list[ScoreResult]
    routing: dict[str, float] | None = Field(None, description="an Arrow route: each skill's (or task's) routing "
                                             "weight averaged over the inputs' tokens, then layers and inputs")


class TaskOut(BaseModel):
    name: str
    kind: Literal["pretrained", "adapted", "composed", "mu", "base", "broken"]
    version: int
    method: str
    row: int | None = None
    created: float | None = None
    mix: dict[str, float] | None = Field(None, description="a composed task's recipe: its tasks and weights")
    route: dict[str, object] | None = Field(None, description="a named Arrow task's route: over, top_k, temperature, "
                                             "granularity")
    reason: str | None = Field(None, description="a broken task's: its file and what is wrong with it")

    @classmethod
    def of(cls, info) -> TaskOut:
        return cls(name=info.name, kind=info.kind, version=info.version, method=info.method, row=info.row,
                   created=info.created, mix=dict(info.recipe) if info.recipe is not None else None,
                   route=dict(info.route) if info.route is not None else None, reason=info.reason)


class ComposeRequest(StrictModel):
    name: TaskName = Field(description="the composed task's name: [A-Za-z0-9._-]{1,64}, not starting with '.'")
    mix: dict[TaskName, float] | None = Field(None, description="tasks and their weights, as in a request's "
                                              "{\"mix\": ...}; or give `route`")
    route: ArrowRoute | None = Field(None, description="a named Arrow route, as in a request's {\"route\": "
                                     "\"arrow\", ...}; or give `mix`")
    overwrite: bool = Field(False, description="replace a composed or adapted task of this name (version goes up)")


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
    method: Literal["mhr-z", "poly-z", "mhr-mu", "retrieve"] = Field(
        "mhr-z", description="what is trained (see README); retrieve: no training, the best mix of known tasks")
    init: Literal["uniform", "retrieve"] = Field(
        "uniform", description="mhr-z / poly-z: start from uniform routing, or from the retrieved mix's routing")
    k: int = Field(3, ge=1, le=16, description="retrieve: how many of the best tasks the mix keeps")
    steps: int = Field(200, ge=1)
    learning_rate: float | None = Field(None, gt=0, le=10, description="default: 0.1 for z methods, 1e-3 for mhr-mu")
    batch_size: int = Field(8, ge=1, le=256)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    validation_fraction: float = Field(0.0, ge=0, le=0.5, description="held out for validation loss / exact match")
    overwrite: bool = Field(False, description="replace an adapted task of this name (its version goes up)")


class RetrievedCandidate(BaseModel):
    task: str
    loss: float = Field(description="mean negative log-likelihood per target token of the examples")
    weight: float = Field(description="its weight in the mix (0: not kept)")


class AdaptResult(BaseModel):
    mix: dict[str, float] = Field(description="the retrieved mix: the best k tasks, weights softmax(-loss)")
    candidates: list[RetrievedCandidate] = Field(description="every task in skill space, best first")


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
    result: AdaptResult | None = Field(None, description="retrieve (and init retrieve): the mix and each candidate "
                                       "task's loss on the examples, best first")


class AdaptJobList(BaseModel):
    jobs: list[AdaptJobOut]


class ExplainRequest(StrictModel):
    task: ArrowRoute
    input: NonEmptyText
    top: int = Field(5, ge=1, le=1024, description="how many experts to list per layer, best first")


class ExpertWeight(BaseModel):
    expert: str
    weight: float


class LayerRouting(BaseModel):
    layer: str
    top: list[ExpertWeight]


class ExplainResponse(BaseModel):
    task: str = Field(description="the route's canonical name")
    granularity: str = Field("token", description="token: weights averaged over the input's tokens; prompt: the "
                             "fixed mix each layer applies to every token of a request with this input")
    experts: list[str] = Field(description="the library: skill-0 … or the task names")
    average: dict[str, float] = Field(description="each expert's weight averaged over the tokens, then the layers")
    layers: list[LayerRouting] = Field(description="per layer that reads the input: its top experts, each weight "
                                       "averaged over the input's tokens")
