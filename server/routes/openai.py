"""OpenAI-compatible routes, `model` = task name: POST /v1/completions, POST /v1/chat/completions (models whose
tokenizer has a chat template), GET /v1/models.

As in OpenAI's API, temperature 0 means greedy decoding and the default (1.0) samples; `n` must be 1. vLLM's
extra sampling fields `min_tokens` and `ignore_eos` work as in vLLM. Fields this server has no use for
(logit_bias, user, …) are accepted and ignored, as OpenAI-compatible servers do, so the OpenAI SDK works unchanged.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..deps import AdmissionDep, EngineDep, MetricsDep, SettingsDep
from ..engine import Completion, Engine, GenerateRow, SamplingParams
from ..errors import ApiError
from ..schemas import ErrorResponse, MixSpec
from ..security import ReadingKey
from ..sse import completion_chunks
from .validation import check_lengths, invalid, rows_of, task_and_texts

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=ReadingKey)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 422, 503)}
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=100_000)]


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = 1
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = Field(None, ge=0)
    min_tokens: int = Field(0, ge=0, description="vLLM's: end of sequence is not allowed before this many tokens")
    ignore_eos: bool = Field(False, description="vLLM's: keep generating after an end of sequence")
    mix: dict[str, float] | None = Field(None, description="serve a skill-space mix of tasks instead of `model` "
                                         "(as /generate's {\"mix\": ...}; the SDK's extra_body)")

    def task(self) -> str | MixSpec:
        return MixSpec.model_construct(mix=self.mix) if self.mix is not None else self.model

    def task_field(self) -> str:
        return "" if self.mix is not None else "model"


class CompletionRequest(SamplingFields):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str, StringConstraints(max_length=100_000)]


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


@router.get("/models")
async def list_models(engine: EngineDep) -> dict:
    created = int(engine.store.inventory.folder.stat().st_mtime)
    return {"object": "list", "data": [
        {"id": t.name, "object": "model", "created": int(t.created or created), "owned_by": "mhr-serve"}
        for t in engine.store.tasks()]}


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, engine: EngineDep, admission: AdmissionDep,
                      settings: SettingsDep, metrics: MetricsDep):
    info, prompts = task_and_texts(engine, metrics, settings, body.task(), body.prompt, "prompt", body.task_field())
    rows = rows_of(info.ref, prompts, _params(body, body.max_tokens, settings))
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        admission.check_capacity()
        pieces = metrics.count_streamed(admission.stream(rows))
        return StreamingResponse(completion_chunks(pieces, rid=rid, created=created, model=info.name),
                                 media_type="text/event-stream")
    done = await admission.generate(rows, until_disconnect=request)
    metrics.tokens.inc(sum(c.completion_tokens for c in done))
    choices = [CompletionChoice(text=c.text, index=i, finish_reason=c.finish_reason) for i, c in enumerate(done)]
    return CompletionResponse(id=rid, created=created, model=info.name, choices=choices, usage=_usage(done))


@router.post("/chat/completions", response_model=ChatResponse, responses=ERRORS)
async def chat_completions(body: ChatRequest, request: Request, engine: EngineDep, admission: AdmissionDep,
                           settings: SettingsDep, metrics: MetricsDep):
    info, _ = task_and_texts(engine, metrics, settings, body.task(), [], "messages", body.task_field())
    prompt_ids = _render_chat(engine, body, settings.max_input_tokens)
    params = _params(body, body.max_completion_tokens or body.max_tokens, settings)
    rows = [GenerateRow(info.ref, "", params, prompt_ids=prompt_ids)]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        admission.check_capacity()
        pieces = metrics.count_streamed(admission.stream(rows))
        return StreamingResponse(completion_chunks(pieces, rid=rid, created=created, model=info.name,
                                                   kind="chat.completion.chunk"), media_type="text/event-stream")
    done = await admission.generate(rows, until_disconnect=request)
    metrics.tokens.inc(sum(c.completion_tokens for c in done))
    choices = [ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
               for i, c in enumerate(done)]
    return ChatResponse(id=rid, created=created, model=info.name, choices=choices, usage=_usage(done))


def _render_chat(engine: Engine, body: ChatRequest, max_input_tokens: int) -> list[int]:
    """The messages rendered with the tokenizer's chat template, as token ids (the template adds the specials)."""
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "unsupported", "messages: this server's model has no chat template; "
                       "use POST /v1/completions with a plain prompt", "messages")
    messages = [m.model_dump() for m in body.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_input_tokens:
        raise invalid("messages", f"{len(ids)} tokens once rendered; at most max_input_tokens={max_input_tokens}")
    return ids


def _params(body: SamplingFields, max_tokens: int | None, settings) -> SamplingParams:
    max_new = max_tokens or 16
    check_lengths(settings, max_new, body.min_tokens, max_field="max_tokens", min_field="min_tokens")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise invalid("stop", "stop strings must not be empty")
    greedy = body.temperature == 0
    return SamplingParams(max_new_tokens=max_new, min_new_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
                          do_sample=not greedy, temperature=body.temperature or 1.0, top_p=body.top_p,
                          seed=body.seed, stop=stop)


def _usage(done: list[Completion]) -> CompletionUsage:
    prompt_tokens = sum(c.prompt_tokens for c in done)
    completion_tokens = sum(c.completion_tokens for c in done)
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)
