"""Guided decoding with llguidance: a row whose params carry a grammar may only choose tokens the grammar allows.

    grammar (llguidance's JSON, from a JSON schema, a regex or a list of choices: server/guided_spec.py)
    RowGuide.allowed(V, eos_ids) -> bool (V,)   the tokens that keep the output inside the grammar (end of sequence
                                                 once it is complete)
    RowGuide.accept(token)                      advance the grammar by the chosen token
The matcher works on token bytes, so it needs the tokenizer's vocabulary as bytes: a fast (Rust) tokenizer as it is,
or a byte-level one (ByT5: id = byte + offset) built here. The end-of-sequence tokens are the model's (its generation
config), which may differ from the tokenizer's.
"""

from __future__ import annotations

from functools import lru_cache

import llguidance
import numpy as np
import torch

# JSON without optional whitespace: a small model cannot wander off into spaces, and the output is compact
JSON_OPTIONS = {"whitespace_flexible": False}


class GuideError(ValueError):
    """The grammar cannot be compiled for this tokenizer (the message says why)."""


def ll_tokenizer(tokenizer, eos_ids: frozenset[int], vocab: int) -> llguidance.LLTokenizer:
    """The tokenizer as llguidance reads it, made once per (tokenizer, end-of-sequence ids, vocabulary size)."""
    return _ll_tokenizer(_Key(tokenizer), tuple(sorted(eos_ids)), vocab)


def check_grammar(grammar: str, tokenizer, eos_ids: frozenset[int], vocab: int) -> None:
    """Raise GuideError with llguidance's message when the grammar does not compile."""
    message = llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer, eos_ids, vocab))
    if message:
        raise GuideError(message.strip())


class RowGuide:
    """One row's grammar state; the matcher is built at the first step, once the vocabulary size is known."""

    def __init__(self, grammar: str, tokenizer):
        self.grammar = grammar
        self.tokenizer = tokenizer
        self.matcher: llguidance.LLMatcher | None = None
        self.eos_ids: list[int] = []

    def allowed(self, vocab: int, eos_ids: frozenset[int]) -> torch.Tensor:
        """(V,) bool: the tokens allowed next; only the end of sequence if the grammar failed."""
        if self.matcher is None:
            self.eos_ids = sorted(eos_ids)
            self.matcher = llguidance.LLMatcher(ll_tokenizer(self.tokenizer, eos_ids, vocab), self.grammar)
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(vocab, dtype=torch.bool)
        width = min(vocab, len(bits))
        allowed[:width] = torch.from_numpy(bits[:width].astype(bool))
        if not allowed.any():
            allowed[self.eos_ids] = True
        return allowed

    def accept(self, token: int) -> None:
        if self.matcher is not None:
            self.matcher.consume_token(token)


class _Key:
    """A tokenizer as a cache key: by identity (tokenizers are not hashable by value)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __hash__(self) -> int:
        return id(self.tokenizer)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Key) and other.tokenizer is self.tokenizer


@lru_cache(maxsize=8)
def _ll_tokenizer(key: _Key, eos: tuple[int, ...], vocab: int) -> llguidance.LLTokenizer:
    tokenizer = key.tokenizer
    offset = getattr(tokenizer, "offset", None)
    if isinstance(offset, int) and getattr(tokenizer, "vocab_size", None) == 256:  # ByT5-like: one token a byte
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary(tokenizer, offset, vocab, eos[0])),
                                      n_vocab=vocab, eos_token=list(eos))
    if getattr(tokenizer, "is_fast", False):
        from llguidance.hf import from_tokenizer

        return from_tokenizer(tokenizer, n_vocab=vocab, eos_token=list(eos))
    raise GuideError(f"guided decoding needs a fast or a byte-level tokenizer; this model's is "
                     f"{type(tokenizer).__name__}")


class _ByteVocabulary:
    """What llguidance's TokenizerWrapper reads of a byte-level tokenizer: each id's bytes (special tokens as
    0xFF + name, llguidance's convention), and text -> ids."""

    def __init__(self, tokenizer, offset: int, vocab: int, eos: int):
        specials = set(tokenizer.all_special_ids)
        names = tokenizer.convert_ids_to_tokens(list(range(offset)))
        self.tokens = [b"\xff" + name.encode() for name in names]  # the ids below the bytes are special tokens
        self.tokens += [bytes([b]) for b in range(256)]
        self.tokens += [b""] * (vocab - len(self.tokens))
        self.special_token_ids = sorted(i for i in specials if i < offset)
        self.eos_token_id = eos
        self.bos_token_id = None
        self.offset = offset

    def __call__(self, text: bytes) -> list[int]:
        return [b + self.offset for b in text]
