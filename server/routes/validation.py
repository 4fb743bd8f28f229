"""Checks that need the server's limits or the tokenizer (pydantic checks the rest); each names its field."""

from __future__ import annotations

from adapter_store import TaskInfo

from ..engine import Engine, GenerateRow, SamplingParams
from ..errors import ApiError
from ..metrics import Metrics
from ..schemas import GenerateRequest
from ..settings import Settings


def as_list(inputs: str | list[str]) -> list[str]:
    return [inputs] if isinstance(inputs, str) else list(inputs)


def task_and_texts(engine: Engine, metrics: Metrics, settings: Settings, task: str, inputs: str | list[str],
                   field: str = "inputs") -> tuple[TaskInfo, list[str]]:
    """The request's task (404 if unknown; counted in metrics) and its inputs as a checked list."""
    info = engine.store.task(task)
    metrics.count_task(info.name)
    texts = as_list(inputs)
    check_texts(texts, field, engine, settings)
    return info, texts


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "validation_error", f"{field}: {message}", field)


def check_texts(texts: list[str], field: str, engine: Engine, settings: Settings) -> None:
    if len(texts) > settings.max_inputs_per_request:
        raise invalid(field, f"{len(texts)} inputs; at most {settings.max_inputs_per_request} per request")
    for i, text in enumerate(texts):
        n = engine.count_tokens(text)
        if n > settings.max_input_tokens:
            where = field if len(texts) == 1 else f"{field}.{i}"
            raise invalid(where, f"{n} tokens; at most max_input_tokens={settings.max_input_tokens}")


def check_lengths(settings: Settings, max_new: int, min_new: int, *, max_field: str = "max_new_tokens",
                  min_field: str = "min_new_tokens") -> None:
    if max_new > settings.max_new_tokens:
        raise invalid(max_field, f"{max_new} is more than the server's limit {settings.max_new_tokens}")
    if min_new > max_new:
        raise invalid(min_field, f"{min_new} is more than {max_field} ({max_new})")


def sampling_params(body: GenerateRequest, settings: Settings) -> SamplingParams:
    max_new = body.max_new_tokens or settings.default_max_new_tokens
    check_lengths(settings, max_new, body.min_new_tokens)
    if body.num_beams > settings.max_num_beams:
        raise invalid("num_beams", f"{body.num_beams} is more than the server's limit {settings.max_num_beams}")
    if body.stream and body.num_beams > 1:
        raise invalid("stream", "streaming is not available with beam search (num_beams > 1)")
    return SamplingParams(max_new_tokens=max_new, min_new_tokens=body.min_new_tokens, ignore_eos=body.ignore_eos,
                          do_sample=body.do_sample, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          num_beams=body.num_beams, seed=body.seed, stop=tuple(body.stop))


def rows_of(task: str, texts: list[str], params: SamplingParams) -> list[GenerateRow]:
    """One engine row per input text."""
    return [GenerateRow(task, text, params, index=i) for i, text in enumerate(texts)]
