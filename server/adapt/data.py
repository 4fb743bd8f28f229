"""Few-shot examples -> training batches (input_ids, attention_mask, labels) for seq2seq or causal LMs."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..engine.sequences import IGNORE, join_prompts


@dataclass(frozen=True)
class Example:
    input: str
    target: str


def split(examples: list[Example], validation_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Shuffle with the seed; hold out round(n * fraction) examples, keeping at least one for training."""
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    n_val = min(round(len(shuffled) * validation_fraction), len(shuffled) - 1)
    return shuffled[n_val:], shuffled[:n_val]


def make_batch(tokenizer, is_seq2seq: bool, examples: list[Example], device) -> dict[str, torch.Tensor]:
    if is_seq2seq:
        enc = tokenizer([e.input for e in examples], return_tensors="pt", padding=True)
        target = tokenizer([e.target for e in examples], return_tensors="pt", padding=True)
        labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, IGNORE)
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                "labels": labels.to(device)}
    return _causal_batch(tokenizer, examples, device)


def _causal_batch(tokenizer, examples: list[Example], device) -> dict[str, torch.Tensor]:
    """prompt + target (+ eos); loss only on the target (transformers shifts the labels itself)."""
    prompts = tokenizer([e.input for e in examples])["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    targets = [ids + eos for ids in tokenizer([e.target for e in examples], add_special_tokens=False)["input_ids"]]
    ids, labels, mask = join_prompts(prompts, targets, tokenizer.pad_token_id)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
