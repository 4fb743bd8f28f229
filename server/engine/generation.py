"""One batched `generate` call for rows that share sampling parameters (see SamplingParams.batch_key)."""

from __future__ import annotations

import torch

from .requests import Completion, GenerateRow
from .streaming import RowStreamer, cut_at_stop


def generate_rows(model, tokenizer, is_seq2seq: bool, device: torch.device,
                  rows: list[GenerateRow]) -> list[Completion]:
    params = rows[0].params
    batch = tokenizer([row.text for row in rows], return_tensors="pt", padding=True).to(device)
    prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
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
        kwargs["streamer"] = RowStreamer(tokenizer, [row.on_text for row in rows], limits,
                                         [row.params.stop for row in rows], eos)
    with torch.inference_mode():
        output = model.generate(**batch, **kwargs)
    new_tokens = output[:, 1:] if is_seq2seq else output[:, batch["input_ids"].shape[1]:]  # drop decoder start
    return [_completion(tokenizer, tokens, eos, row, n_prompt)
            for tokens, row, n_prompt in zip(new_tokens.tolist(), rows, prompt_tokens, strict=True)]


def _completion(tokenizer, tokens: list[int], eos: int | None, row: GenerateRow, n_prompt: int) -> Completion:
    generated, finish = tokens[: row.params.max_new_tokens], "length"
    if eos is not None and eos in generated:  # padding only ever follows the end of sequence
        generated, finish = generated[: generated.index(eos)], "stop"
    text, stopped = cut_at_stop(tokenizer.decode(generated, skip_special_tokens=True), row.params.stop)
    return Completion(text, n_prompt, len(generated), "stop" if stopped else finish)
