"""The engine's per-token log-probabilities (TokenLogprob) in OpenAI's two shapes.

    completions:  {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}
                  top_logprobs holds the k most likely tokens and always the chosen one (so up to k + 1), as
                  OpenAI and vLLM do; a position with no prediction has null logprob and null top_logprobs
    chat:         content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}] (exactly k)}]
Token strings and bytes: server/token_strings.py.
"""

from __future__ import annotations

from ..engine.rows import TokenLogprob
from ..token_strings import TokenStrings
from .responses import ChatLogprobs, CompletionLogprobs, TokenLogprobOut, TopLogprob


def completion_logprobs(entries: list[TokenLogprob], strings: TokenStrings) -> CompletionLogprobs:
    tokens, offsets, position = [], [], 0
    for entry in entries:
        tokens.append(strings.string(entry.token))
        offsets.append(position)
        position += strings.text_length(entry.token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=[e.logprob for e in entries],
                              top_logprobs=[_top_dict(e, strings) for e in entries], text_offset=offsets)


def _top_dict(entry: TokenLogprob, strings: TokenStrings) -> dict[str, float] | None:
    if entry.logprob is None:
        return None
    top = {strings.string(token): logprob for token, logprob in entry.top}
    top.setdefault(strings.string(entry.token), entry.logprob)  # the chosen token, even outside the top k
    return top


def chat_logprobs(entries: list[TokenLogprob], strings: TokenStrings) -> ChatLogprobs:
    """One entry per token of the message's content (the caller leaves a final end of sequence out)."""
    content = [TokenLogprobOut(**_top(entry.token, entry.logprob, strings).model_dump(),
                               top_logprobs=[_top(token, logprob, strings) for token, logprob in entry.top])
               for entry in entries]
    return ChatLogprobs(content=content)


def _top(token: int, logprob: float, strings: TokenStrings) -> TopLogprob:
    return TopLogprob(token=strings.string(token), logprob=logprob, bytes=strings.bytes(token))
