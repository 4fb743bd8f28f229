"""The running batch's model state — KV caches, masks, positions — arranged so rows can join and leave
between decoding steps (continuous batching).

Rows are right-aligned: every row's newest position is the cache's last column. A joining row whose cache is
shorter is left-padded with zeros that its mask hides; a longer one left-pads the batch instead.
    causal LM (Llama, GQA):  cache (N, kv_heads, P, d), mask (N, P); each row's next position id is its own
                             token count, so padding never shifts its rotary positions
    seq2seq (T5):            decoder self-attention cache and mask as above; cross-attention keys and values
                             (N, heads, S, d) computed once at the row's prefill (with its adapter), right-padded
                             to the longest input, encoder mask (N, S). T5's relative position bias depends only
                             on the query-key distance, which right-alignment keeps for every row.
A decoding step feeds each row's last token (N, 1) and appends one column. Rows that leave are dropped with one
`index_select` per cache tensor; then columns that are padding for every remaining row are dropped as well.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from . import kv_cache
from .loader import ModelLoadError


class DecodeState(ABC):
    mask: torch.Tensor  # (N, P) long: 1 where a row has a real (decoder) position

    def __len__(self) -> int:
        return self.mask.shape[0]

    @abstractmethod
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (N,); return the next-token logits (N, V)."""

    @abstractmethod
    def select(self, keep: list[int]) -> None:
        """Keep rows `keep`, in that order (rows not named leave the batch)."""

    @abstractmethod
    def extend(self, other: DecodeState) -> None:
        """Append `other`'s rows (just prefilled) after this batch's rows."""

    def width(self) -> int:
        """Decoder (or causal) positions per row, padding included."""
        return self.mask.shape[1]

    def held_positions(self) -> int:
        """Cached positions per row, padding included: what the caches cost per row."""
        return self.width()

    def _append_column(self) -> torch.Tensor:
        ones = torch.ones(len(self), 1, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)  # (N, P + 1)
        return self.mask


def _leading_padding(mask: torch.Tensor) -> int:
    """How many first columns are padding for every row."""
    used = mask.any(dim=0).nonzero()
    return int(used[0]) if len(used) else 0


def _trailing_padding(mask: torch.Tensor) -> int:
    used = mask.any(dim=0).nonzero()
    return mask.shape[1] - 1 - int(used[-1]) if len(used) else 0


def _pad_mask(mask: torch.Tensor, left: int = 0, right: int = 0) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (left, right))


def _unless_full(mask: torch.Tensor) -> torch.Tensor | None:
    """No mask where no row has padding: attention then takes its unmasked (causal) path, as in generate()."""
    return None if bool(mask.all()) else mask


SEQ2SEQ_TYPES = ("t5", "mt5", "umt5")  # relative position bias: right-aligned padding keeps every distance


SUPPORTED = (f"seq2seq models of type {', '.join(SEQ2SEQ_TYPES)}; causal LMs whose layers all use full attention "
             "(no sliding window) and whose forward takes position_ids (Llama, Mistral without sliding window, Qwen2, "
             "GPT-NeoX, …)")


def check_loop_supported(model, is_seq2seq: bool) -> None:
    """The decoding loop serves T5-like seq2seq models and causal LMs with full attention that take position ids;
    any other model stops start-up, naming its type and what is supported."""
    if is_seq2seq:
        supported = model.config.model_type in SEQ2SEQ_TYPES
    else:
        supported = kv_cache.supports_row_surgery(model.config) and \
            "position_ids" in inspect.signature(model.forward).parameters
    if not supported:
        raise ModelLoadError(f"{type(model).__name__} (model_type {model.config.model_type!r}) cannot be served by the "
                             f"decoding loop; supported: {SUPPORTED}")


class CausalState(DecodeState):
    def __init__(self, model, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor):
        self.model = model
        self.cache = cache
        self.mask = mask  # (N, P)
        self.positions = positions  # (N,) the next position id of each row

    @classmethod
    def prefill(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[CausalState, torch.Tensor]:
        """Left-padded prompts (M, Q) -> the new rows' state and their first next-token logits (M, V)."""
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (M, Q): padding gets position 0, masked
        cache = kv_cache.RowCache()
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1)
        return cls(model, cache, attention_mask, attention_mask.sum(dim=1)), out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = self._append_column()
        out = self.model(input_ids=tokens[:, None], attention_mask=_unless_full(mask),
                         position_ids=self.positions[:, None], cache=self.cache, use_cache=True)
        self.positions = self.positions + 1
        return out.logits[:, -1]  # (N, V)

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        kv_cache.select_rows(self.cache, index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        unused = _leading_padding(self.mask)
        kv_cache.drop_columns(self.cache, left=unused)
        self.mask = self.mask[:, unused:]

    def extend(self, other: CausalState) -> None:
        width = max(self.width(), other.width())
        for state in (self, other):
            pad = width - state.width()
            kv_cache.pad_columns(state.cache, left=pad)
            state.mask = _pad_mask(state.mask, left=pad)
        kv_cache.join_rows(self.cache, other.cache)
        self.mask = torch.cat([self.mask, other.mask])
        self.positions = torch.cat([self.positions, other.positions])


class Seq2SeqState(DecodeState):
    def __init__(self, model, cache: EncoderDecoderCache, mask: torch.Tensor, encoder_mask: torch.Tensor):
        self.model = model
        self.cache = cache
        self.mask = mask  # (N, P) decoder positions
        self.encoder_mask = encoder_mask  # (N, S)
        self.d_model = model.config.d_model

    @classmethod
    def prefill(cls, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[Seq2SeqState, torch.Tensor]:
        """Inputs (M, S) -> encoder, then the first decoder step from the start token: state and logits (M, V).
        The cross-attention keys and values land in the cache here, computed with the rows' adapters."""
        rows = input_ids.shape[0]
        start = torch.full((rows, 1), model.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        decoder_mask = torch.ones_like(start)
        cache = EncoderDecoderCache(kv_cache.RowCache(), DynamicCache())  # the cross-attention part never grows
        out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=start,
                    decoder_attention_mask=decoder_mask, cache=cache, use_cache=True)
        return cls(model, cache, decoder_mask, attention_mask), out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = self._append_column()
        rows, length = self.encoder_mask.shape
        # the cross-attention reads its cached keys and values: the encoder states only give their shape
        encoder_shape = torch.zeros(1, 1, self.d_model, dtype=self.model.dtype, device=mask.device).expand(
            rows, length, self.d_model)
        out = self.model(encoder_outputs=(encoder_shape,), attention_mask=_unless_full(self.encoder_mask),
                         decoder_input_ids=tokens[:, None], decoder_attention_mask=_unless_full(mask),
                         cache=self.cache, use_cache=True)
        return out.logits[:, -1]  # (N, V)

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        for cache in (self.cache.self_attention_cache, self.cache.cross_attention_cache):
            kv_cache.select_rows(cache, index)
        self.mask, self.encoder_mask = self.mask[index], self.encoder_mask[index]
        unused = _leading_padding(self.mask)
        kv_cache.drop_columns(self.cache.self_attention_cache, left=unused)
        self.mask = self.mask[:, unused:]
        unused = _trailing_padding(self.encoder_mask)
        kv_cache.drop_columns(self.cache.cross_attention_cache, right=unused)
        self.encoder_mask = self.encoder_mask[:, : self.encoder_mask.shape[1] - unused]

    def extend(self, other: Seq2SeqState) -> None:
        width = max(self.width(), other.width())
        length = max(self.encoder_mask.shape[1], other.encoder_mask.shape[1])
        for state in (self, other):
            left = width - state.width()
            kv_cache.pad_columns(state.cache.self_attention_cache, left=left)
            state.mask = _pad_mask(state.mask, left=left)
            right = length - state.encoder_mask.shape[1]
            kv_cache.pad_columns(state.cache.cross_attention_cache, left=0, right=right)
            state.encoder_mask = _pad_mask(state.encoder_mask, right=right)
        kv_cache.join_rows(self.cache.self_attention_cache, other.cache.self_attention_cache)
        kv_cache.join_rows(self.cache.cross_attention_cache, other.cache.cross_attention_cache)
        for layer, updated in other.cache.is_updated.items():
            self.cache.is_updated[layer] = self.cache.is_updated.get(layer, False) or updated
        self.mask = torch.cat([self.mask, other.mask])
        self.encoder_mask = torch.cat([self.encoder_mask, other.encoder_mask])

    def held_positions(self) -> int:
        return self.width() + self.encoder_mask.shape[1]


def prefill(model, is_seq2seq: bool, input_ids: torch.Tensor, attention_mask: torch.Tensor
            ) -> tuple[DecodeState, torch.Tensor]:
    kind = Seq2SeqState if is_seq2seq else CausalState
    return kind.prefill(model, input_ids, attention_mask)
