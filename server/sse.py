"""Server-sent events for streamed generation: the framing of /generate's events and of OpenAI's completion
chunks, over the (row, text, completions) stream of `Admission.stream`.

    /generate:        data: {"index", "text"} per piece ... then  event: done / data: <the whole response>
    /v1/completions:  data: {"choices": [{"text", "index", "finish_reason"}], ...} per piece ... then data: [DONE]
An error after the first byte cannot change the status line: it is sent in-band, in the usual error shape.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from .engine import Completion
from .errors import error_body, error_type

Pieces = AsyncIterator[tuple[int, str, list[Completion] | None]]


def event(data: dict, name: str | None = None) -> str:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data)}\n\n"


async def generate_events(pieces: Pieces, response: Callable[[list[Completion]], dict]) -> AsyncIterator[str]:
    """`data: {"index", "text"}` per new piece of text, then `event: done` with response(completions)."""
    try:
        async for index, text, completions in pieces:
            if completions is None:
                yield event({"index": index, "text": text})
            else:
                yield event(response(completions), name="done")
    except Exception as exc:
        yield event(error_body(error_type(exc), str(exc)), name="error")


async def completion_chunks(pieces: Pieces, *, rid: str, created: int, model: str,
                            kind: str = "text_completion") -> AsyncIterator[str]:
    """OpenAI's stream: a chunk per piece, a last chunk per row with its finish_reason, then `data: [DONE]`.
    kind "chat.completion.chunk" sends `delta: {"content"}` instead of `text`."""
    def chunk(index: int, text: str, finish: str | None) -> str:
        choice = ({"text": text, "logprobs": None} if kind == "text_completion"
                  else {"delta": {"content": text} if text else {}})
        choice.update(index=index, finish_reason=finish)
        return event({"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]})

    try:
        async for index, text, completions in pieces:
            if completions is None:
                yield chunk(index, text, None)
            else:
                for i, completion in enumerate(completions):
                    yield chunk(i, "", completion.finish_reason)
    except Exception as exc:  # as OpenAI does: an error object in the stream
        yield event(error_body(error_type(exc), str(exc)))
    yield "data: [DONE]\n\n"
