"""The model both servers load in bench/vs_vllm.py: a random causal LM of SmolLM-135M's shape (12 layers instead of
30), a byte-level BPE tokenizer trained here (nothing downloaded), a random MHR inventory over every projection, and
its 16 tasks exported as plain PEFT LoRAs (for vLLM's --lora-modules).

The tokenizer learns far fewer than 49152 tokens from a few KB of text; the model keeps SmolLM's vocabulary size and
the ids past the tokenizer's (and the ones that do not decode to printable ASCII) get zero output rows, so greedy
decoding never picks them: every generated token is visible ASCII text on both servers.
"""

from __future__ import annotations

import copy
import random
import string
from pathlib import Path

import torch
from peft import PolyConfig, get_peft_model
from peft.tuners.poly.router import PolyRouter
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adapter_store import AdapterStore

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_TASKS = 16
END_OF_TEXT = "<|endoftext|>"
SHARPEN = 30.0
ADAPTER_SCALE = 8.0


def smollm_135m_config(num_layers: int = 12) -> LlamaConfig:
    """SmolLM-135M's config values (its hub config.json), with fewer layers."""
    return LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        num_hidden_layers=num_layers, vocab_size=49152, max_position_embeddings=2048, rope_theta=10000.0,
        rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        pad_token_id=None, initializer_range=0.02, torch_dtype="float32",
    )


def training_text(seed: int = 0, n_words: int = 1500) -> str:
    """A few KB of made-up lowercase words and digits, the same every run."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "vo", "ze", "qua", "pri", "ost", "el", "an", "dor"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n_words)]
    words += [str(rng.randint(0, 99999)) for _ in range(n_words // 10)]
    rng.shuffle(words)
    return " ".join(words) + "\n" + string.printable


def train_tokenizer(folder: Path, vocab_size: int = 49152) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([training_text()], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                   unk_token=END_OF_TEXT, model_max_length=2048)
    fast.save_pretrained(folder)
    return fast


def visible_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids that decode on their own to non-empty printable ASCII (no specials, no partial UTF-8)."""
    keep = []
    for token_id in range(len(tokenizer)):
        if token_id in tokenizer.all_special_ids:
            continue
        text = tokenizer.decode([token_id])
        if text and all(c in string.printable and c not in "\t\n\r\x0b\x0c" for c in text):
            keep.append(token_id)
    return keep


def sharpen_to(model: LlamaForCausalLM, allowed: list[int], factor: float = SHARPEN) -> None:
    """Make greedy choices decided by the weights, not float noise (as tests/factories.sharpen), and zero the output
    rows of every id not allowed (those ids never enter a prompt, so their zero input embeddings do not matter).

    The output layer is tied to the input embeddings here, so the scale goes on the final norm's weight instead:
    scaling the shared matrix would make every token's own embedding dominate the residual stream, and the model
    would repeat its last input token forever."""
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
        weight = model.get_output_embeddings().weight
        keep = torch.zeros(weight.shape[0], dtype=torch.bool)
        keep[allowed] = True
        weight[~keep] = 0


def random_inventory(base: LlamaForCausalLM, folder: Path, seed: int = 0) -> None:
    """PEFT Poly/MHR, r=8, K=8 skills, H=8 splits, 16 tasks, B != 0 and spread-out router logits (as
    tests/factories.make_inventory). B is scaled by ADAPTER_SCALE: with PEFT's random init as it is, a routed task
    changed the greedy 32-token output of only 1 prompt in 8 (so equal outputs on both servers proved little); ×8,
    all 8, and tasks differ from each other."""
    torch.manual_seed(seed)
    config = PolyConfig(task_type="CAUSAL_LM", r=8, n_skills=8, n_splits=8, n_tasks=N_TASKS,
                        target_modules=TARGETS, init_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "poly_lora_B" in name:
                parameter.mul_(ADAPTER_SCALE)
    for module in peft_model.modules():
        if isinstance(module, PolyRouter):
            torch.nn.init.normal_(module.module_logits, std=2.0)
    peft_model.save_pretrained(str(folder))


def export_loras(inventory: Path, out_dir: Path) -> dict[str, Path]:
    """Every pretrained task as a PEFT LoRA folder, with AdapterStore.export_lora; {task name: folder}."""
    store = AdapterStore.open(inventory)
    names = [t.name for t in store.tasks() if t.kind == "pretrained"]
    return {name: store.export_lora(name, out_dir / name, overwrite=True) for name in names}


def build_bundle(folder: Path, seed: int = 0) -> dict:
    """model/ (weights + tokenizer), inventory/, loras/<task>/ under `folder`; returns their paths and task names."""
    model_dir, inventory_dir = folder / "model", folder / "inventory"
    tokenizer = train_tokenizer(model_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(smollm_135m_config()).eval()
    sharpen_to(model, visible_ids(tokenizer))
    model.save_pretrained(model_dir)
    random_inventory(model, inventory_dir, seed)
    loras = export_loras(inventory_dir, folder / "loras")
    return {"model": model_dir, "inventory": inventory_dir, "loras": loras, "tokenizer_size": len(tokenizer)}
