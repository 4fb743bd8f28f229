"""POST /generate: one input or a list, any task (or __mu__), greedy / sampling / beams, optional SSE stream."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..deps import AdmissionDep, EngineDep, MetricsDep, SettingsDep
from ..engine import Completion
from ..guided_spec import generate_grammar, off_the_loop
from ..schemas import ErrorResponse, GenerateRequest, GenerateResponse, Output, TokenLogprobOut, TopToken, Usage
from ..security import ReadingKey
from ..sse import generate_events
from ..token_strings import TokenStrings, token_strings
from .validation import Served, mean_routing, rows_of, sampling_params, task_and_texts, version_served

router = APIRouter(tags=["generate"])
ERRORS = {code: {"model": ErrorResponse} for code in (404, 422, 503)}


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS, dependencies=ReadingKey)
async def generate(body: GenerateRequest, request: Request, engine: EngineDep, admission: AdmissionDep,
                   settings: SettingsDep, metrics: MetricsDep):
    target, texts, ids = task_and_texts(engine, metrics, settings, body.task, body.inputs)
    grammar = await off_the_loop(generate_grammar, body.guided, engine)
    rows = rows_of(target.ref, texts, sampling_params(body, settings, grammar), ids)
    if body.stream:
        admission.check_capacity()
        pieces = metrics.count_streamed(admission.stream(rows))
        return StreamingResponse(generate_events(pieces, lambda done: to_response(target, done).model_dump()),
                                 media_type="text/event-stream")
    completions = await admission.generate(rows, until_disconnect=request)
    metrics.tokens.inc(sum(c.completion_tokens for c in completions))
    return to_response(target, completions, token_strings(engine.tokenizer))


def to_response(target: Served, completions: list[Completion], strings: TokenStrings | None = None
                ) -> GenerateResponse:
    outputs = [Output(text=c.text, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                      finish_reason=c.finish_reason, logprobs=_logprobs(c, strings)) for c in completions]
    usage = Usage(prompt_tokens=sum(o.prompt_tokens for o in outputs),
                  completion_tokens=sum(o.completion_tokens for o in outputs))
    return GenerateResponse(task=target.name, version=version_served(target, completions[0].version), outputs=outputs,
                            usage=usage, routing=mean_routing([c.routing for c in completions]))


def _logprobs(completion: Completion, strings: TokenStrings | None) -> list[TokenLogprobOut] | None:
    """One entry per generated token (a final end of sequence is not one of them)."""
    if completion.logprobs is None or strings is None:
        return None
    return [TokenLogprobOut(token=strings.string(e.token), id=e.token, logprob=e.logprob,
                            top=[TopToken(token=strings.string(t), id=t, logprob=v) for t, v in e.top])
            for e in completion.logprobs[: completion.completion_tokens]]
