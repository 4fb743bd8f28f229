"""OpenAI-compatible completions: POST /v1/completions and GET /v1/models, with `model` = task name.

As in OpenAI's API, temperature 0 means greedy decoding and the default (1.0) samples; `n` must be 1.
Fields this server has no use for (logit_bias, user, …) are accepted and ignored, as OpenAI-compatible
servers do, so the OpenAI SDK works unchanged.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..deps import BatcherDep, EngineDep, MetricsDep, SettingsDep
from ..engine import GenerateRow, SamplingParams
from ..errors import error_type
from ..schemas import ErrorResponse
from ..security import ReadingKey
from .generate import stream_events
from .validation import invalid, task_and_texts

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=ReadingKey)
ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 422, 503)}
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=100_000)]


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = 1
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = Field(None, ge=0)


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


@router.get("/models")
async def list_models(engine: EngineDep) -> dict:
    created = int(engine.store.inventory.folder.stat().st_mtime)
    return {"object": "list", "data": [
        {"id": t.name, "object": "model", "created": int(t.created or created), "owned_by": "mhr-serve"}
        for t in engine.store.tasks()]}


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(body: CompletionRequest, engine: EngineDep, batcher: BatcherDep, settings: SettingsDep,
                      metrics: MetricsDep):
    info, prompts = task_and_texts(engine, metrics, settings, body.model, body.prompt, "prompt")
    params = _params(body, settings.max_new_tokens)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        batcher.check_capacity()
        return StreamingResponse(_chunks(batcher, info, prompts, params, rid, created), media_type="text/event-stream")
    done = await batcher.generate([GenerateRow(info.name, p, params) for p in prompts])
    metrics.tokens.inc(sum(c.completion_tokens for c in done))
    choices = [CompletionChoice(text=c.text, index=i, finish_reason=c.finish_reason) for i, c in enumerate(done)]
    prompt_tokens, completion_tokens = sum(c.prompt_tokens for c in done), sum(c.completion_tokens for c in done)
    usage = CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens)
    return CompletionResponse(id=rid, created=created, model=info.name, choices=choices, usage=usage)


def _params(body: CompletionRequest, limit: int) -> SamplingParams:
    max_new = body.max_tokens or 16
    if max_new > limit:
        raise invalid("max_tokens", f"{max_new} is more than the server's limit {limit}")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise invalid("stop", "stop strings must not be empty")
    greedy = body.temperature == 0
    return SamplingParams(max_new_tokens=max_new, do_sample=not greedy, temperature=body.temperature or 1.0,
                          top_p=body.top_p, seed=body.seed, stop=stop)


async def _chunks(batcher, info, prompts, params, rid: str, created: int) -> AsyncIterator[str]:
    """OpenAI's stream: `data: {choices: [{text, index, finish_reason}]}` chunks, then `data: [DONE]`."""
    def chunk(index: int, text: str, finish: str | None) -> str:
        payload = {"id": rid, "object": "text_completion", "created": created, "model": info.name,
                   "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        async for index, text, completions in stream_events(batcher, info, prompts, params):
            if completions is None:
                yield chunk(index, text, None)
            else:
                for i, completion in enumerate(completions):
                    yield chunk(i, "", completion.finish_reason)
    except Exception as exc:  # the status line is gone already: report in-band, as OpenAI does
        yield f"data: {json.dumps({'error': {'type': error_type(exc), 'message': str(exc)}})}\n\n"
    yield "data: [DONE]\n\n"
