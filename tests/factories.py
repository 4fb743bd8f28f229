"""Tiny random models and PEFT Poly / MHR inventories built from configs (never downloaded)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import PolyConfig, get_peft_model
from peft.tuners.poly.router import PolyRouter
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

T5_TARGETS = ["q", "k", "v", "o", "wi", "wo"]
T5_GATED_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]  # T5 v1.1's gated feed-forward
LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def tiny_t5(seed: int = 0, d_model: int = 32, tie: bool = True, gated: bool = False) -> T5ForConditionalGeneration:
    """gated: T5 v1.1's feed-forward (wi_0, wi_1, wo with gated-gelu) instead of T5's (wi, wo with relu)."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=259, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, tie_word_embeddings=tie,
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def make_inventory(base, folder: Path, *, task_type: str, targets: list[str], n_tasks: int = 3,
                   n_skills: int = 4, n_splits: int = 2, r: int = 2, seed: int = 0,
                   task_names: list[str] | None = None):
    """Save a random Poly/MHR inventory for `base` (B != 0, spread-out router logits) into `folder`.

    Returns the PEFT model (wrapping a deep copy of `base`, in eval mode) for reference outputs.
    """
    torch.manual_seed(seed)
    config = PolyConfig(task_type=task_type, r=r, n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits,
                        target_modules=targets, init_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    for module in peft_model.modules():
        if isinstance(module, PolyRouter):
            torch.nn.init.normal_(module.module_logits, std=2.0)  # distinct tasks, not ≈ uniform
    peft_model.eval()
    peft_model.save_pretrained(str(folder))
    if task_names is not None:
        (Path(folder) / "tasks.json").write_text(json.dumps({n: i for i, n in enumerate(task_names)}))
    return peft_model


def set_uniform_routing(peft_model) -> None:
    """Make every router row equal, so PEFT computes the μ adapter for any task id."""
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, PolyRouter):
                module.module_logits.zero_()


PRINTABLE_IDS = range(3 + 32, 3 + 127)  # ByT5 ids of the printable ASCII bytes (id = byte + 3)


def sharpen(model, factor: float = 30.0):
    """Scale the output layer so greedy choices are decided by the weights, not by float noise."""
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight.mul_(factor)
        weight[model.config.pad_token_id] = 0  # never prefer padding: a random model otherwise repeats it
    return model


def printable_only(model):
    """Zero the output rows of every id but printable ASCII: their logits are 0 while the top printable
    logits of this tiny model are ~20, so it never ends a sequence (no EOS: every row runs to its own
    max_new_tokens) and every token it emits is one visible character of the decoded text."""
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        keep = torch.zeros(weight.shape[0], dtype=torch.bool)
        keep[list(PRINTABLE_IDS)] = True
        weight[~keep] = 0
    return model


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as one printable character (what tokenizers' ByteLevel reads)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def save_bos_byte_tokenizer(folder: Path) -> None:
    """Replace the ByT5 tokenizer in `folder` with a Llama-like one over the same ids (byte b -> b + 3; <pad> 0,
    <s> 1, </s> 2: tiny_llama's pad, bos, eos) that puts <s> first and adds nothing at the end, as causal LMs'
    tokenizers do (ByT5's appends </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{char: b + 3 for b, char in _byte_to_unicode().items()}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                             special_tokens=[("<s>", 1)])
    for old in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (Path(folder) / old).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)


def engine_for(folder: Path, device: str = "cpu", **options):
    """An Engine over a bundle saved by save_bundle (the model on `device`, an adapter cache of its dtype there)."""
    from adapter_store import AdapterCache, AdapterStore
    from server.engine import Engine, load_model

    loaded = load_model(folder / "model", device=device)
    return Engine(loaded, AdapterStore.open(folder / "inventory"), AdapterCache(10**8, loaded.device, loaded.dtype),
                  **options)


def save_bundle(folder: Path, kind: str = "t5", *, n_splits: int = 2, n_tasks: int = 3, seed: int = 0,
                task_names: list[str] | None = None, sharp: bool | float = True, printable: bool = False):
    """model/ (+ ByT5 tokenizer) and inventory/ under `folder`; returns (base model, PEFT reference).

    kind: "t5", "t5-gated" (T5 v1.1's wi_0 / wi_1 feed-forward) or "llama". sharp: True (factor 30), a
    factor, or False (the random output layer as it is: sampling then really varies). printable: see
    printable_only (never ends, only visible characters)."""
    from transformers import ByT5Tokenizer

    if kind in ("t5", "t5-gated"):
        gated = kind == "t5-gated"
        base, task_type = tiny_t5(seed, tie=False, gated=gated), "SEQ_2_SEQ_LM"
        targets = T5_GATED_TARGETS if gated else T5_TARGETS
    else:
        base, task_type, targets = tiny_llama(seed), "CAUSAL_LM", LLAMA_TARGETS
    if sharp:
        sharpen(base, 30.0 if sharp is True else float(sharp))
    if printable:
        printable_only(base)
    base.save_pretrained(folder / "model")
    ByT5Tokenizer(extra_ids=0).save_pretrained(folder / "model")
    peft_model = make_inventory(base, folder / "inventory", task_type=task_type, targets=targets,
                                n_splits=n_splits, n_tasks=n_tasks, seed=seed, task_names=task_names)
    return base, peft_model
