"""Which models the serving loop decodes: its attention runs through transformers' attention interface over the KV
pool (paged_attention.py), with per-row positions. T5-like seq2seq models (relative position bias, added per row);
causal LMs whose layers all use full attention (a sliding window or linear attention keeps state the pool does not
hold) and whose forward takes position ids. Any other model stops start-up with a message naming its type.
"""

from __future__ import annotations

import inspect

from .loader import ModelLoadError

SEQ2SEQ_TYPES = ("t5", "mt5", "umt5")  # relative position bias, added per row by distance


SUPPORTED = (f"seq2seq models of type {', '.join(SEQ2SEQ_TYPES)}; causal LMs whose layers all use full attention "
             "(no sliding window) and whose forward takes position_ids (Llama, Mistral without a sliding window, "
             "Qwen2, …)")


def check_loop_supported(model, is_seq2seq: bool) -> None:
    """The decoding loop serves T5-like seq2seq models and causal LMs with full attention that take position ids;
    any other model stops start-up, naming its type and what is supported."""
    if is_seq2seq:
        supported = model.config.model_type in SEQ2SEQ_TYPES
    else:
        supported = full_attention_only(model.config) and \
            "position_ids" in inspect.signature(model.forward).parameters
    if not supported:
        raise ModelLoadError(f"{type(model).__name__} (model_type {model.config.model_type!r}) cannot be served by the "
                             f"decoding loop; supported: {SUPPORTED}")


def full_attention_only(config) -> bool:
    """Only full attention: sliding-window or linear-attention layers keep state the KV pool does not hold."""
    text = config.get_text_config(decoder=True)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    return kinds == {"full_attention"} and not getattr(text, "sliding_window", None)
