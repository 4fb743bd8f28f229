"""Whole-generation calls to transformers' `generate`, for what the serving loop does not decode itself: beam
search, and the request-level "static" scheduler kept for comparison. Rows share a call only when their
`call_key` is equal. Run as guests of the loop (guest.py), one decoding step per turn."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .row_text import cut_at_stop
from .rows import Completion, GenerateRow, SamplingParams
from .streaming import RowStreamer


def call_key(params: SamplingParams) -> tuple:
    """Rows may share one generate() call only when this key is equal: greedy rows share regardless of length (a
    greedy prefix does not depend on the limit, and each row's end-of-sequence rule is its own: _EosGuard); beam
    results depend on the limit; sampling shares one seed."""
    if params.num_beams > 1:
        return ("beam", params.num_beams, params.max_new_tokens)
    if params.do_sample:
        return ("sample", params.temperature, params.top_p, params.top_k, params.seed)
    return ("greedy",)


def eos_token_ids(model) -> frozenset[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(eos) if isinstance(eos, list) else frozenset([eos])


def generate_rows(model, tokenizer, is_seq2seq: bool, device: torch.device, rows: list[GenerateRow], *,
                  logits_processor: list | None = None) -> list[Completion]:
    """One generate() call for rows of one call_key."""
    params = rows[0].params
    batch = tokenizer([row.text for row in rows], return_tensors="pt", padding=True).to(device)
    prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
    eos = eos_token_ids(model)
    limits = [row.params.max_new_tokens for row in rows]
    kwargs = dict(max_new_tokens=max(limits), num_beams=params.num_beams, do_sample=params.do_sample,
                  pad_token_id=tokenizer.pad_token_id)
    if params.do_sample:
        kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if params.seed is not None:
            torch.manual_seed(params.seed)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if any(row.on_text for row in rows):
        kwargs["streamer"] = RowStreamer(tokenizer, rows, eos)
    guard = _EosGuard(rows, eos, params.num_beams)
    with torch.inference_mode():
        output = model.generate(**batch, **kwargs, logits_processor=[guard, *(logits_processor or [])])
    new_tokens = output[:, 1:] if is_seq2seq else output[:, batch["input_ids"].shape[1]:]  # drop decoder start
    return [_completion(tokenizer, tokens, eos, row, n_prompt)
            for tokens, row, n_prompt in zip(new_tokens.tolist(), rows, prompt_tokens, strict=True)]


class _EosGuard(LogitsProcessor):
    """Each row's own end-of-sequence rule in a shared call: forbidden before its min_new_tokens, and never chosen
    with ignore_eos (generate has no "keep going after it")."""

    def __init__(self, rows: list[GenerateRow], eos: frozenset[int], beams: int):
        self.until = torch.tensor([r.params.max_new_tokens if r.params.ignore_eos else r.params.min_new_tokens
                                   for r in rows]).repeat_interleave(beams)  # (N * beams,) new tokens
        self.eos = sorted(eos)
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.start = input_ids.shape[1] if self.start is None else self.start
        early = (self.until > input_ids.shape[1] - self.start).nonzero().squeeze(1)  # rows still too short
        if self.eos and len(early):
            scores[early[:, None].to(scores.device), torch.tensor(self.eos, device=scores.device)[None, :]] = \
                -float("inf")
        return scores


def _completion(tokenizer, tokens: list[int], eos: frozenset[int], row: GenerateRow, n_prompt: int) -> Completion:
    generated, finish = tokens[: row.params.max_new_tokens], "length"
    ends = [i for i, token in enumerate(generated) if token in eos]
    if ends:  # padding only ever follows the end of sequence
        generated, finish = generated[: ends[0]], "stop"
    text, stopped = cut_at_stop(tokenizer.decode(generated, skip_special_tokens=True), row.params.stop)
    return Completion(text, n_prompt, len(generated), "stop" if stopped else finish)
