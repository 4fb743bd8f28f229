"""The engine's per-token log-probabilities (TokenLogprob) in OpenAI's two shapes.

    completions:  {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}
                  top_logprobs holds the k most likely tokens and always the chosen one (so up to k + 1), as
                  OpenAI and vLLM do; a position with no prediction has null logprob and null top_logprobs
    chat:         content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}] (exactly k)}]
A token's string is its decoded text, or the tokenizer's own token where that is not whole text (ByT5: the byte's
character, for one byte of a multi-byte character). Its bytes are the UTF-8 bytes of that string, or the raw byte
of a byte-level tokenizer's byte token.
"""

from __future__ import annotations

from functools import lru_cache

from ..engine.rows import TokenLogprob
from .responses import ChatLogprobs, CompletionLogprobs, TokenLogprobOut, TopLogprob

INCOMPLETE = "\ufffd"


class TokenStrings:
    """Token id -> its string and bytes, for one tokenizer (cached per id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_offset = _byte_offset(tokenizer)
        self.string = lru_cache(maxsize=65536)(self._string)

    def _string(self, token: int) -> str:
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        if text and INCOMPLETE not in text:
            return text
        return self.tokenizer.convert_ids_to_tokens(token)

    def text_length(self, token: int) -> int:
        """The characters this token adds to the choice's text (special tokens add none)."""
        return 0 if token in self.tokenizer.all_special_ids else len(self.string(token))

    def bytes(self, token: int) -> list[int]:
        if self.byte_offset is not None and self.byte_offset <= token < self.byte_offset + 256:
            return [token - self.byte_offset]
        return list(self.string(token).encode("utf-8"))


_STRINGS: dict[int, TokenStrings] = {}  # id(tokenizer) -> its strings (checked: an id may be reused)


def token_strings(tokenizer) -> TokenStrings:
    """The tokenizer's TokenStrings, made once."""
    known = _STRINGS.get(id(tokenizer))
    if known is None or known.tokenizer is not tokenizer:
        known = _STRINGS[id(tokenizer)] = TokenStrings(tokenizer)
    return known


def _byte_offset(tokenizer) -> int | None:
    """ByT5-like tokenizers: token id = byte + offset for the 256 bytes."""
    offset = getattr(tokenizer, "offset", None)
    return offset if isinstance(offset, int) and getattr(tokenizer, "vocab_size", None) == 256 else None


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
