"""Checks that need the server's limits or the tokenizer (pydantic checks the rest); each names its field."""

from __future__ import annotations

from dataclasses import dataclass

from adapter_store import MixError, TaskRef
from adapter_store.arrow import ArrowError, ArrowSpec

from ..engine import Engine, GenerateRow, SamplingParams
from ..errors import ApiError
from ..metrics import Metrics
from ..schemas import ArrowRoute, GenerateRequest, MixSpec
from ..settings import Settings


@dataclass(frozen=True)
class Served:
    """What a request is served with: a task (its name and version now), a mix or an Arrow route (its canonical
    name)."""

    ref: TaskRef | ArrowSpec
    name: str
    version: int | None


def as_list(inputs: str | list[str]) -> list[str]:
    return [inputs] if isinstance(inputs, str) else list(inputs)


def served(engine: Engine, metrics: Metrics, settings: Settings, task: str | MixSpec | ArrowRoute,
           field: str = "task") -> Served:
    """The request's task (404 if unknown, 409 for a composition whose member is gone), mix or Arrow route (422
    naming the field at fault), counted in metrics."""
    if isinstance(task, ArrowRoute):
        spec = arrow_spec(engine, task, field)
        metrics.count_task("arrow")
        return Served(spec, spec.name, None)
    if isinstance(task, MixSpec):
        try:
            mix = engine.store.check_mix(task.mix, settings.max_mix_tasks)
        except MixError as exc:
            raise invalid(f"{field}.{exc.field}" if field else exc.field, str(exc)) from None
        metrics.count_task("mix")
        return Served(mix, mix.name, None)
    info = engine.store.task(task)
    metrics.count_task(info.name)
    if info.route is not None:  # a named Arrow route
        return Served(arrow_spec(engine, ArrowRoute(route="arrow", **dict(info.route)), field), info.name,
                      info.version)
    if info.recipe is not None:
        engine.store.cache_key(task)  # its members are all there (else 409 now, not after queueing)
    return Served(info.name, info.name, info.version)


def arrow_spec(engine: Engine, route: ArrowRoute, field: str = "task") -> ArrowSpec:
    """The route as the engine takes it; 422 naming the field for a bad over / top_k / temperature / granularity, or
    a top_k over the library's size."""
    try:
        spec = ArrowSpec(route.over, route.top_k, route.temperature, route.granularity)
        engine.check_arrow(spec)
    except ArrowError as exc:
        raise invalid(f"{field}.{exc.field}" if field else exc.field, str(exc)) from None
    return spec


def mean_routing(routings: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Each expert's weight averaged over the rows that report one (None: no Arrow row)."""
    found = [r for r in routings if r]
    if not found:
        return None
    return {expert: sum(r[expert] for r in found) / len(found) for expert in found[0]}


def version_served(target: Served, ran: int | None) -> int | None:
    """The version of the adapter that ran (the engine pins it when the request's first row starts); none for
    a mix."""
    return None if target.version is None else ran or target.version


def task_and_texts(engine: Engine, metrics: Metrics, settings: Settings, task: str | MixSpec | ArrowRoute,
                   inputs: str | list[str], field: str = "inputs", task_field: str = "task"
                   ) -> tuple[Served, list[str], list[list[int]]]:
    """The request's task or mix (see `served`), its inputs as a checked list, and their token ids."""
    target = served(engine, metrics, settings, task, task_field)
    texts = as_list(inputs)
    return target, texts, check_texts(texts, field, engine, settings)


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "validation_error", f"{field}: {message}", field)


def check_texts(texts: list[str], field: str, engine: Engine, settings: Settings) -> list[list[int]]:
    """Each text's token ids, checked against the limits (the rows take them: the serving loop does not tokenise
    again)."""
    if len(texts) > settings.max_inputs_per_request:
        raise invalid(field, f"{len(texts)} inputs; at most {settings.max_inputs_per_request} per request")
    ids = [engine.token_ids(text) for text in texts]
    for i, row_ids in enumerate(ids):
        if len(row_ids) > settings.max_input_tokens:
            where = field if len(texts) == 1 else f"{field}.{i}"
            raise invalid(where, f"{len(row_ids)} tokens; at most max_input_tokens={settings.max_input_tokens}")
    return ids


def check_lengths(settings: Settings, max_new: int, min_new: int, *, max_field: str = "max_new_tokens",
                  min_field: str = "min_new_tokens") -> None:
    if max_new > settings.max_new_tokens:
        raise invalid(max_field, f"{max_new} is more than the server's limit {settings.max_new_tokens}")
    if min_new > max_new:
        raise invalid(min_field, f"{min_new} is more than {max_field} ({max_new})")


def check_guided(grammar: str | None, *, beams: int = 1, min_new: int = 0, ignore_eos: bool = False,
                 field: str = "guided", names: tuple[str, str] = ("min_new_tokens", "ignore_eos")) -> None:
    """Guided rows run in the decoding loop and end when their grammar is complete: no beams, no forced length."""
    if grammar is None:
        return
    if beams > 1:
        raise invalid(field, "not available with beam search (num_beams > 1)")
    if min_new:
        raise invalid(names[0], f"not available with {field}: the grammar decides where the output ends")
    if ignore_eos:
        raise invalid(names[1], f"not available with {field}: the grammar decides where the output ends")


def sampling_params(body: GenerateRequest, settings: Settings, grammar: str | None = None) -> SamplingParams:
    max_new = body.max_new_tokens or settings.default_max_new_tokens
    check_lengths(settings, max_new, body.min_new_tokens)
    beam_limit = min(settings.max_num_beams, settings.max_batch_size)  # beams decode as rows of one batch
    if body.num_beams > beam_limit:
        raise invalid("num_beams", f"{body.num_beams} is more than the server's limit {beam_limit}")
    if body.stream and body.num_beams > 1:
        raise invalid("stream", "streaming is not available with beam search (num_beams > 1)")
    if body.logprobs is not None and (body.num_beams > 1 or body.stream):
        raise invalid("logprobs", "not available with beam search (num_beams > 1) or stream")
    check_guided(grammar, beams=body.num_beams, min_new=body.min_new_tokens, ignore_eos=body.ignore_eos)
    return SamplingParams(max_new_tokens=max_new, min_new_tokens=body.min_new_tokens, ignore_eos=body.ignore_eos,
                          do_sample=body.do_sample, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          num_beams=body.num_beams, seed=body.seed, stop=tuple(body.stop),
                          logprobs=body.logprobs, grammar=grammar)


def rows_of(task: TaskRef | ArrowSpec, texts: list[str], params: SamplingParams, ids: list[list[int]]
            ) -> list[GenerateRow]:
    """One engine row per input text, with its token ids (task_and_texts)."""
    return [GenerateRow(task, text, params, index=i, prompt_ids=row_ids)
            for i, (text, row_ids) in enumerate(zip(texts, ids, strict=True))]
