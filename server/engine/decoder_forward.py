"""One decoding forward of the model over the KV pool: a causal LM's, or T5's decoder with its cross-attention keys
already in the pool. PagedKV.decode (its Step set on the thread) and static_step.py (its inputs in `extra`) share it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import EncoderDecoderCache

from .paged_attention import PoolCache


def decoder_forward(model, seq2seq: bool, layers: int, ids: torch.Tensor, positions: torch.Tensor,
                    no_mask: torch.Tensor, **extra) -> torch.Tensor:
    """ids, positions (N, 1) -> the next-token logits (N, V). `no_mask`: a prepared 4D mask, so transformers
    builds none (attention masks per row itself)."""
    with torch.inference_mode():
        if not seq2seq:
            out = model(input_ids=ids, position_ids=positions, attention_mask=no_mask, cache=PoolCache(),
                        use_cache=True, **extra)
            return out.logits[:, -1]
        cache = EncoderDecoderCache(PoolCache(), PoolCache(cross=True, layers=layers))
        cache.is_updated = dict.fromkeys(range(layers), True)  # cross keys are in the pool already
        d_model = model.config.d_model
        encoder_shape = torch.zeros(1, 1, d_model, dtype=model.dtype, device=ids.device).expand(
            ids.shape[0], 1, d_model)  # only its shape is read
        out = model(encoder_outputs=(encoder_shape,), attention_mask=no_mask, decoder_input_ids=ids,
                    decoder_attention_mask=no_mask, cache=cache, use_cache=True, **extra)
        return out.logits[:, -1]
