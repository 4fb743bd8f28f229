"""OpenAI-compatible routes, `model` = task name: POST /v1/completions, POST /v1/chat/completions (models whose
tokenizer has a chat template), GET /v1/models.

As in OpenAI's API, temperature 0 means greedy decoding and the default (1.0) samples; `n` choices per prompt
(index = prompt × n + choice); log-probabilities as vLLM serves them (openai_compat/logprobs.py), `echo` for the
prompt's own. vLLM's extra fields `min_tokens`, `ignore_eos` and `top_k` work as in vLLM. Which OpenAI fields are
served, accepted without effect, or refused with 422: openai_compat/requests.py.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..deps import AdmissionDep, EngineDep, MetricsDep, SettingsDep
from ..engine import Completion, Engine, GenerateRow, SamplingParams
from ..engine.rows import TokenLogprob
from ..errors import ApiError
from ..guided_spec import off_the_loop, response_format_grammar
from ..openai_compat.logprobs import chat_logprobs, completion_logprobs
from ..openai_compat.prompts import PromptIn, prompts_of
from ..openai_compat.requests import ChatRequest, CompletionRequest, SamplingFields, refused_field
from ..openai_compat.responses import (
    AssistantMessage,
    ChatChoice,
    ChatResponse,
    CompletionChoice,
    CompletionResponse,
    CompletionUsage,
)
from ..schemas import ErrorResponse
from ..security import ReadingKey
from ..sse import completion_chunks
from ..token_strings import token_strings
from .validation import check_guided, check_lengths, invalid, served

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=ReadingKey)
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 422, 503)}


@router.get("/models")
async def list_models(engine: EngineDep) -> dict:
    created = int(engine.store.inventory.folder.stat().st_mtime)
    return {"object": "list", "data": [
        {"id": t.name, "object": "model", "created": int(t.created or created), "owned_by": "mhr-serve"}
        for t in engine.store.tasks()]}


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, engine: EngineDep, admission: AdmissionDep,
                      settings: SettingsDep, metrics: MetricsDep):
    _check_completion_fields(body, engine.loaded.is_seq2seq)
    info = _served(body, engine, metrics, settings)
    prompts = prompts_of(body.prompt, engine, settings)
    grammar = await off_the_loop(response_format_grammar, body.response_format, engine)
    rows = _completion_rows(body, info.ref, prompts, settings, grammar)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return _streamed(admission, metrics, rows, rid=rid, created=created, model=info.name)
    if body.max_tokens == 0:  # echo only: nothing generated
        done = [Completion("", len(row.prompt_ids), 0, "length", logprobs=[]) for row in rows]
    else:
        done = await admission.generate(rows, until_disconnect=request)
    metrics.tokens.inc(sum(c.completion_tokens for c in done))
    echoed = await _echoed(body, engine, admission, info.ref, prompts)
    kept = _best(done, len(rows) // len(prompts), body.n)
    choices = [_completion_choice(body, engine, c, prompts[i // body.n], echoed[i // body.n] if echoed else None, i)
               for i, c in enumerate(kept)]
    return CompletionResponse(id=rid, created=created, model=info.name, choices=choices,
                              usage=_usage(prompts, done))


@router.post("/chat/completions", response_model=ChatResponse, responses=ERRORS)
async def chat_completions(body: ChatRequest, request: Request, engine: EngineDep, admission: AdmissionDep,
                           settings: SettingsDep, metrics: MetricsDep):
    _check_chat_fields(body)
    info = _served(body, engine, metrics, settings)
    _check_rows(body.n, settings)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    grammar = await off_the_loop(response_format_grammar, body.response_format, engine)
    params = _params(body, body.max_completion_tokens or body.max_tokens, settings, grammar, logprobs=logprobs)
    prompt = PromptIn("", _render_chat(engine, body, settings.max_input_tokens))
    rows = [GenerateRow(info.ref, "", params, index=j, prompt_ids=prompt.ids) for j in range(body.n)]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return _streamed(admission, metrics, rows, rid=rid, created=created, model=info.name,
                         kind="chat.completion.chunk")
    done = await admission.generate(rows, until_disconnect=request)
    metrics.tokens.inc(sum(c.completion_tokens for c in done))
    strings = token_strings(engine.tokenizer)
    choices = [ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                          logprobs=chat_logprobs((c.logprobs or [])[: c.completion_tokens], strings)
                          if body.logprobs else None)
               for i, c in enumerate(done)]
    return ChatResponse(id=rid, created=created, model=info.name, choices=choices, usage=_usage([prompt], done))


def _served(body: SamplingFields, engine: Engine, metrics, settings):
    """The task, or the mix in `mix` or written in `model` as mix(a=0.7,b=0.3)."""
    try:
        task = body.task()
    except ValueError as exc:
        raise invalid("model", str(exc)) from None
    return served(engine, metrics, settings, task, body.task_field())


def _streamed(admission, metrics, rows: list[GenerateRow], **chunk_fields) -> StreamingResponse:
    admission.check_capacity()
    pieces = metrics.count_streamed(admission.stream(rows))
    return StreamingResponse(completion_chunks(pieces, **chunk_fields), media_type="text/event-stream")


def _check_common(body: SamplingFields) -> None:
    refused = refused_field(body)
    if refused is not None:
        raise invalid(refused, "not supported by this server (see the README's OpenAI-compatible API)")


def _check_completion_fields(body: CompletionRequest, is_seq2seq: bool) -> None:
    """The completion request's fields that only make sense together: 422 naming the one at fault."""
    _check_common(body)
    if body.best_of is not None and body.best_of < body.n:
        raise invalid("best_of", f"{body.best_of} is less than n ({body.n})")
    if body.best_of is not None and body.best_of > body.n and body.stream:
        raise invalid("best_of", "best_of > n is not available with stream")
    for name in ("logprobs", "echo"):
        if body.stream and getattr(body, name) not in (None, False):
            raise invalid(name, "not available with stream")
    if body.max_tokens == 0 and not body.echo:
        raise invalid("max_tokens", "0 is only meaningful with echo (score the prompt, generate nothing)")
    if body.max_tokens == 0 and body.logprobs is not None and is_seq2seq:
        raise invalid("echo", "this is a seq2seq model: its prompt is the encoder's input and has no "
                      "log-probabilities; score a continuation with POST /score")


def _check_chat_fields(body: ChatRequest) -> None:
    _check_common(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise invalid("top_logprobs", "needs logprobs: true")
    if body.stream and body.logprobs:
        raise invalid("logprobs", "not available with stream")


def _check_rows(count: int, settings) -> None:
    if count > settings.max_inputs_per_request:
        raise invalid("n", f"{count} choices in all; at most {settings.max_inputs_per_request} per request")


def _completion_rows(body: CompletionRequest, task, prompts: list[PromptIn], settings, grammar: str | None
                     ) -> list[GenerateRow]:
    """best_of (default n) rows per prompt: row i × best_of + j is draw j of prompt i (its random stream)."""
    drawn = body.best_of or body.n
    _check_rows(len(prompts) * drawn, settings)
    ranked = drawn > body.n and body.logprobs is None  # ranking needs each token's log-probability
    params = _params(body, body.max_tokens, settings, grammar, logprobs=0 if ranked else body.logprobs)
    return [GenerateRow(task, p.text, params, index=i * drawn + j, prompt_ids=p.ids)
            for i, p in enumerate(prompts) for j in range(drawn)]


def _best(done: list[Completion], drawn: int, n: int) -> list[Completion]:
    """Of each prompt's `drawn` completions, the n with the highest summed log-probability (OpenAI's best_of)."""
    if drawn == n:
        return done
    groups = [done[start: start + drawn] for start in range(0, len(done), drawn)]
    return [c for group in groups
            for c in sorted(group, key=lambda c: sum(e.logprob for e in c.logprobs or []), reverse=True)[:n]]


async def _echoed(body: CompletionRequest, engine: Engine, admission, task, prompts: list[PromptIn]
                  ) -> list[list[TokenLogprob]] | None:
    """With echo and logprobs: each prompt's tokens with their log-probabilities (seq2seq: none, null)."""
    if not body.echo or body.logprobs is None:
        return None
    if engine.loaded.is_seq2seq:
        return [[TokenLogprob(token, None) for token in p.ids] for p in prompts]
    return await admission.prompt_logprobs(task, [p.ids for p in prompts], body.logprobs)


def _completion_choice(body: CompletionRequest, engine: Engine, done: Completion, prompt: PromptIn,
                       echoed: list[TokenLogprob] | None, index: int) -> CompletionChoice:
    text = prompt.text + done.text if body.echo else done.text
    logprobs = None
    if body.logprobs is not None:
        entries = [*(echoed or []), *(done.logprobs or [])]
        logprobs = completion_logprobs(entries, token_strings(engine.tokenizer))
    return CompletionChoice(text=text, index=index, logprobs=logprobs, finish_reason=done.finish_reason)


def _render_chat(engine: Engine, body: ChatRequest, max_input_tokens: int) -> list[int]:
    """The messages rendered with the tokenizer's chat template, as token ids (the template adds the specials)."""
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "unsupported", "messages: this server's model has no chat template; "
                       "use POST /v1/completions with a plain prompt", "messages")
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_input_tokens:
        raise invalid("messages", f"{len(ids)} tokens once rendered; at most max_input_tokens={max_input_tokens}")
    return ids


def _params(body: SamplingFields, max_tokens: int | None, settings, grammar: str | None, *,
            logprobs: int | None) -> SamplingParams:
    max_new = 16 if max_tokens is None else max_tokens
    check_guided(grammar, min_new=body.min_tokens, ignore_eos=body.ignore_eos, field="response_format",
                 names=("min_tokens", "ignore_eos"))
    check_lengths(settings, max_new, body.min_tokens, max_field="max_tokens", min_field="min_tokens")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise invalid("stop", "stop strings must not be empty")
    greedy = body.temperature == 0
    return SamplingParams(max_new_tokens=max(max_new, 1), min_new_tokens=body.min_tokens,
                          ignore_eos=body.ignore_eos, do_sample=not greedy, temperature=body.temperature or 1.0,
                          top_p=body.top_p, top_k=max(body.top_k, 0), seed=body.seed, stop=stop, logprobs=logprobs,
                          grammar=grammar)


def _usage(prompts: list[PromptIn], done: list[Completion]) -> CompletionUsage:
    """Prompt tokens once per prompt (not per choice), completion tokens of every choice."""
    prompt_tokens = sum(len(p.ids) for p in prompts)
    completion_tokens = sum(c.completion_tokens for c in done)
    return CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                           total_tokens=prompt_tokens + completion_tokens)
