"""A row's text while its tokens arrive: incremental decoding, stop strings, and the part safe to stream.

Decoding the whole sequence at every step costs O(length) per token; instead (as TGI and vLLM do) each step
decodes a short window: the tokens since `prefix` with and without the newest ones, and keeps the difference
once it no longer ends in an incomplete character. The prefix tokens give the tokenizer its context (leading
spaces of sentencepiece pieces, multi-byte characters of byte-level tokenizers).
A stop string is searched only where new text could complete one. The streamable text holds back the last
len(longest stop) - 1 characters, which could still become the start of a stop string.
The final text is decoded from all tokens at once (see `final_text`), so it never depends on the windows.
"""

from __future__ import annotations

from collections.abc import Sequence

INCOMPLETE = "\ufffd"  # what a tokenizer decodes an unfinished multi-byte character to


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class RowText:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) - 1 for s in stop), default=0)
        self.tokens: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.stopped = False
        self.sent = 0  # characters handed out by `streamable`
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> bool:
        """Append a token; True when the text now contains a stop string (the text is cut there)."""
        self.tokens.append(token)
        delta = self._delta()
        if not delta:
            return False
        searched_from = max(0, len(self.text) - self.hold)
        self.text += delta
        if self.stop:
            cuts = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
            if cuts:
                self.text, self.stopped = self.text[: min(cuts)], True
        return self.stopped

    def streamable(self, finished: bool = False) -> str:
        """New text that can no longer change (all of it once `finished`); marks it as sent."""
        end = len(self.text) if finished or self.stopped else max(len(self.text) - self.hold, 0)
        piece = self.text[self.sent: end]
        if not finished:
            piece = piece.rstrip(INCOMPLETE)
        self.sent += len(piece)
        return piece

    def final_text(self, tokens: list[int]) -> str:
        """The row's answer: `tokens` (without a final end-of-sequence) decoded at once, cut at a stop string."""
        return cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), self.stop)[0]

    def _delta(self) -> str:
        decode = self.tokenizer.decode
        before = decode(self.tokens[self._prefix: self._read], skip_special_tokens=True)
        after = decode(self.tokens[self._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return after[len(before):]
