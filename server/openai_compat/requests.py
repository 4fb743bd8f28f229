"""Request bodies of /v1/completions and /v1/chat/completions, and what becomes of each OpenAI field.

Every field of OpenAI's two requests is in one of three groups (README, "OpenAI-compatible API"):
    supported                 declared below and served
    accepted, without effect  bookkeeping that cannot change an output (ACCEPTED)
    refused                   422 naming the field, unless it holds the value that means "not used" (REFUSED)
A field in none of them (a typo, another server's extension) is refused too (extra="forbid").
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..schemas import MixSpec

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=100_000)]
TokenIds = Annotated[list[int], Field(min_length=1)]
MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # most likely tokens per position (vLLM's default limit)

# bookkeeping fields: accepted with any value, they change nothing in what is generated
ACCEPTED = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")


def _absent(value: Any) -> bool:
    return value is None or value in ({}, [], "")


# field -> when its value means "not used" (then it is accepted); any other value: 422 naming the field
REFUSED_COMMON = {
    "logit_bias": _absent,
    "presence_penalty": lambda v: v is None or v == 0,
    "frequency_penalty": lambda v: v is None or v == 0,
    "stream_options": lambda v: _absent(v) or v == {"include_usage": False},
}
REFUSED_COMPLETIONS = {**REFUSED_COMMON, "suffix": _absent}
REFUSED_CHAT = {
    **REFUSED_COMMON,
    "tools": _absent, "tool_choice": lambda v: v is None or v == "none", "parallel_tool_calls": lambda v: True,
    "functions": _absent, "function_call": lambda v: v is None or v == "none",
    "audio": _absent, "modalities": lambda v: _absent(v) or v == ["text"], "prediction": _absent,
    "reasoning_effort": _absent, "verbosity": _absent, "web_search_options": _absent,
}


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, StringConstraints(min_length=1, max_length=2048)] = Field(
        description="a task's name, or a mix written as its canonical name: mix(a=0.7,b=0.3)")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="vLLM's: keep the k most likely tokens when sampling (0 or -1: all)")
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    min_tokens: int = Field(0, ge=0, description="vLLM's: end of sequence is not allowed before this many tokens")
    ignore_eos: bool = Field(False, description="vLLM's: keep generating after an end of sequence")
    mix: dict[str, float] | None = Field(None, description="serve a skill-space mix of tasks instead of `model` "
                                         "(as /generate's {\"mix\": ...}; the SDK's extra_body)")
    response_format: Any = Field(None, description="structured output: {\"type\": \"json_schema\", \"json_schema\": "
                                 "{\"schema\": ...}}, {\"type\": \"json_object\"} or {\"type\": \"text\"}")
    # accepted, without effect
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # refused unless "not used" (see REFUSED_*)
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    stream_options: Any = None

    def task(self) -> str | MixSpec:
        if self.mix is not None:
            return MixSpec.model_construct(mix=self.mix)
        mix = mix_in_name(self.model)
        return MixSpec.model_construct(mix=mix) if mix is not None else self.model

    def task_field(self) -> str:
        return "" if self.mix is not None else "model"


class CompletionRequest(SamplingFields):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1)] = Field(description="a text, texts, token ids, or lists of token ids")
    max_tokens: int | None = Field(None, ge=0, description="0: no generation (with echo: score the prompt)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="the chosen token's log-probability and "
                                 "the k most likely tokens at each position")
    echo: bool = Field(False, description="the prompt (its tokens and their log-probabilities) before the completion")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="draw this many per prompt, return the n with "
                                "the highest summed log-probability (null: n)")
    suffix: Any = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Annotated[str, StringConstraints(max_length=100_000)]
    name: str | None = None


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    logprobs: bool = Field(False, description="each content token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="with logprobs: the k most likely "
                                     "tokens at each position")
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None


MIX_NAME = re.compile(r"mix\((.*)\)")
MIX_MEMBER = re.compile(r"([A-Za-z0-9._-]+)=([0-9.eE+-]+)")


def mix_in_name(model: str) -> dict[str, float] | None:
    """`model` = "mix(a=0.7,b=0.3)" (a mix's canonical name, as responses report it) -> its weights; else None.
    Lets clients that can only set `model` (lm-eval's local-completions) serve a mix."""
    found = MIX_NAME.fullmatch(model)
    if found is None:
        return None
    members = [MIX_MEMBER.fullmatch(part.strip()) for part in found.group(1).split(",")]
    if not all(members):
        raise ValueError("a mix in `model` is written mix(task=weight,task=weight,...)")
    return {m.group(1): float(m.group(2)) for m in members}


def refused_field(body: SamplingFields) -> str | None:
    """The first field that asks for something this server does not do, if any."""
    refused = REFUSED_CHAT if isinstance(body, ChatRequest) else REFUSED_COMPLETIONS
    return next((name for name, unused in refused.items() if not unused(getattr(body, name))), None)
