"""POST /generate: one input or a list, any task (or __mu__), greedy / sampling / beams, optional SSE stream."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..deps import AdmissionDep, EngineDep, MetricsDep, SettingsDep
from ..engine import Completion
from ..schemas import ErrorResponse, GenerateRequest, GenerateResponse, Output, Usage
from ..security import ReadingKey
from ..sse import generate_events
from .validation import Served, mean_routing, rows_of, sampling_params, task_and_texts, version_served

router = APIRouter(tags=["generate"])
ERRORS = {code: {"model": ErrorResponse} for code in (404, 422, 503)}


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS, dependencies=ReadingKey)
async def generate(body: GenerateRequest, request: Request, engine: EngineDep, admission: AdmissionDep,
                   settings: SettingsDep, metrics: MetricsDep):
    target, texts = task_and_texts(engine, metrics, settings, body.task, body.inputs)
    rows = rows_of(target.ref, texts, sampling_params(body, settings))
    if body.stream:
        admission.check_capacity()
        pieces = metrics.count_streamed(admission.stream(rows))
        return StreamingResponse(generate_events(pieces, lambda done: to_response(target, done).model_dump()),
                                 media_type="text/event-stream")
    completions = await admission.generate(rows, until_disconnect=request)
    metrics.tokens.inc(sum(c.completion_tokens for c in completions))
    return to_response(target, completions)


def to_response(target: Served, completions: list[Completion]) -> GenerateResponse:
    outputs = [Output(text=c.text, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                      finish_reason=c.finish_reason) for c in completions]
    usage = Usage(prompt_tokens=sum(o.prompt_tokens for o in outputs),
                  completion_tokens=sum(o.completion_tokens for o in outputs))
    return GenerateResponse(task=target.name, version=version_served(target, completions[0].version), outputs=outputs,
                            usage=usage, routing=mean_routing([c.routing for c in completions]))
