"""Token id -> the string and bytes that responses show for it (log-probabilities of /generate and the OpenAI routes).

A token's string is its decoded text, or the tokenizer's own token where that is not whole text (ByT5: the byte's
character, for one byte of a multi-byte character). Its bytes are the UTF-8 bytes of that string, or the raw byte
of a byte-level tokenizer's byte token.
"""

from __future__ import annotations

from functools import lru_cache

INCOMPLETE = "\ufffd"  # what a tokenizer decodes an unfinished multi-byte character to


class TokenStrings:
    """Token id -> its string and bytes, for one tokenizer (cached per id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_offset = _byte_offset(tokenizer)
        self.special = frozenset(tokenizer.all_special_ids)
        self.string = lru_cache(maxsize=65536)(self._string)

    def _string(self, token: int) -> str:
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        if text and INCOMPLETE not in text:
            return text
        return self.tokenizer.convert_ids_to_tokens(token)

    def text_length(self, token: int) -> int:
        """The characters this token adds to the choice's text (special tokens add none)."""
        return 0 if token in self.special else len(self.string(token))

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
