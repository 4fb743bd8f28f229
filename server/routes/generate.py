"""POST /generate: one input or a list, any task (or __mu__), greedy / sampling / beams, optional SSE stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from adapter_store import TaskInfo

from ..batcher import Batcher
from ..deps import BatcherDep, EngineDep, MetricsDep, SettingsDep
from ..engine import Completion, GenerateRow, SamplingParams
from ..errors import error_type
from ..schemas import ErrorResponse, GenerateRequest, GenerateResponse, Output, Usage
from ..security import ReadingKey
from .validation import sampling_params, task_and_texts

router = APIRouter(tags=["generate"])
ERRORS = {code: {"model": ErrorResponse} for code in (404, 422, 503)}


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS, dependencies=ReadingKey)
async def generate(body: GenerateRequest, engine: EngineDep, batcher: BatcherDep, settings: SettingsDep,
                   metrics: MetricsDep):
    info, texts = task_and_texts(engine, metrics, settings, body.task, body.inputs)
    params = sampling_params(body, settings)
    if body.stream:
        batcher.check_capacity()
        return StreamingResponse(_events(batcher, info, texts, params), media_type="text/event-stream")
    completions = await batcher.generate([GenerateRow(info.name, text, params) for text in texts])
    metrics.tokens.inc(sum(c.completion_tokens for c in completions))
    return to_response(info, completions)


def to_response(info: TaskInfo, completions: list[Completion]) -> GenerateResponse:
    outputs = [Output(text=c.text, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                      finish_reason=c.finish_reason) for c in completions]
    usage = Usage(prompt_tokens=sum(o.prompt_tokens for o in outputs),
                  completion_tokens=sum(o.completion_tokens for o in outputs))
    return GenerateResponse(task=info.name, version=info.version, outputs=outputs, usage=usage)


def _sse(data: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


async def stream_events(batcher: Batcher, info: TaskInfo, texts: list[str],
                        params: SamplingParams) -> AsyncIterator[tuple[int, str, list[Completion] | None]]:
    """Yield (row, new text, None) as text arrives, then the rest of each row, then (-1, "", completions).

    Errors after the first byte cannot change the status line: they propagate to the caller's generator.
    """
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[tuple[int, str]] = asyncio.Queue()

    def sink(index: int):
        return lambda text: loop.call_soon_threadsafe(pieces.put_nowait, (index, text))

    rows = [GenerateRow(info.name, text, params, on_text=sink(i)) for i, text in enumerate(texts)]
    job = asyncio.ensure_future(batcher.generate(rows))
    sent = [""] * len(texts)
    while not (job.done() and pieces.empty()):
        getter = asyncio.ensure_future(pieces.get())
        await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            continue
        index, text = getter.result()
        sent[index] += text
        yield index, text, None
    completions = job.result()
    for index, completion in enumerate(completions):
        rest = completion.text[len(sent[index]):] if completion.text.startswith(sent[index]) else ""
        if rest:
            yield index, rest, None
    yield -1, "", completions


async def _events(batcher: Batcher, info: TaskInfo, texts: list[str], params: SamplingParams) -> AsyncIterator[str]:
    """`data: {"index", "text"}` per new piece of text, then `event: done` with the whole response."""
    try:
        async for index, text, completions in stream_events(batcher, info, texts, params):
            if completions is None:
                yield _sse({"index": index, "text": text})
            else:
                yield _sse(to_response(info, completions).model_dump(), event="done")
    except Exception as exc:  # the status line is gone already: report in-band, in the usual error shape
        yield _sse({"error": {"type": error_type(exc), "message": str(exc), "field": None}}, event="error")
