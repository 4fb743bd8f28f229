"""Rank classification (as in T0's evaluation): the log-likelihood of each choice given the input.

seq2seq: encoder reads the input, the decoder is teacher-forced on the choice (with its end-of-sequence
token, as the tokenizer adds it). causal LM: the choice's tokens continue the input's.
`prompt_logprobs` gives the same causal log-probabilities token by token (with the most likely tokens), for
OpenAI's `echo` / `logprobs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rows import TokenLogprob
from .sampling import logprob_entries
from .sequences import IGNORE, join_prompts


def score_pairs(model, tokenizer, is_seq2seq: bool, device: torch.device, texts: list[str],
                choices: list[str]) -> list[tuple[float, int]]:
    """(sum of log-probabilities of the choice's tokens, number of tokens) for each (text, choice) pair."""
    if is_seq2seq:
        logits, labels = _seq2seq_logits(model, tokenizer, device, texts, choices)
    else:
        logits, labels = _causal_logits(model, tokenizer, device, texts, choices)
    mask = labels != IGNORE  # (N, T)
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask  # (N, T)
    return list(zip(picked.sum(dim=1).tolist(), mask.sum(dim=1).tolist(), strict=True))


@torch.inference_mode()
def _seq2seq_logits(model, tokenizer, device, texts, choices):
    enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
    target = tokenizer(choices, return_tensors="pt", padding=True).to(device)
    labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, IGNORE)  # (N, T)
    logits = model(**enc, labels=labels).logits  # (N, T, V)
    return logits, labels


@torch.inference_mode()
def _causal_logits(model, tokenizer, device, texts, choices):
    prompts = tokenizer(texts, add_special_tokens=True)["input_ids"]
    conts = tokenizer(choices, add_special_tokens=False)["input_ids"]
    ids, labels, attention = join_prompts(prompts, conts, tokenizer.pad_token_id)
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits  # (N, T, V)
    return logits[:, :-1], labels[:, 1:].to(device)  # position t predicts token t+1


@torch.inference_mode()
def prompt_logprobs(model, device: torch.device, prompts: list[list[int]], top_k: int,
                    pad_id: int) -> list[list[TokenLogprob]]:
    """Causal LM, teacher-forced on token ids: for each prompt, every token with log P(token | the tokens before it)
    and the top_k most likely tokens at its position; the first token has no prediction (logprob None)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # right-padded
    attention = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)] = torch.tensor(prompt)
        attention[i, : len(prompt)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits  # (N, T, V)
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1).cpu()  # (N, T-1, V): position t predicts token t+1
    out = []
    for i, prompt in enumerate(prompts):
        first = TokenLogprob(prompt[0], None)
        out.append([first, *logprob_entries(logprobs[i, : len(prompt) - 1], ids[i, 1: len(prompt)], top_k)])
    return out
