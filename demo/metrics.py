"""Greedy decoding and exact match, for a plain seq2seq model or a PEFT model routed by task ids."""

from __future__ import annotations

import torch

from demo.batches import decode_ids, make_batch
from demo.tasks import MAX_LEN, examples, with_prefix

MAX_NEW_TOKENS = 2 * MAX_LEN + 2  # longest target ("double") plus EOS and one spare


@torch.no_grad()
def greedy_decode(model, inputs: list[str], task_ids: list[int] | None, batch_size: int = 256) -> list[str]:
    """Greedy outputs for ``inputs``; ``task_ids`` (one per input) is passed through to PEFT Poly."""
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        ids = task_ids[start : start + batch_size] if task_ids is not None else [0] * len(chunk)
        batch = make_batch(chunk, chunk, ids)
        extra = {"task_ids": batch.task_ids} if task_ids is not None else {}
        generated = model.generate(
            input_ids=batch.input_ids,  # (B, S)
            attention_mask=batch.attention_mask,  # (B, S)
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            num_beams=1,
            **extra,
        )  # (B, 1 + T): starts with the decoder start id
        outputs.extend(decode_ids(row[1:].tolist()) for row in generated)
    return outputs


def exact_match(predictions: list[str], targets: list[str]) -> float:
    return sum(p == t for p, t in zip(predictions, targets, strict=True)) / max(1, len(targets))


def per_task_exact_match(
    model,
    tasks: list[str],
    n: int,
    seed: int,
    task_ids: list[int] | None = None,
    prefixed: bool = False,
) -> dict[str, float]:
    """Exact match per task on ``n`` fresh examples each, all tasks decoded in shared batches.

    ``task_ids``: router row per task (None: no task ids, e.g. the bare backbone).
    ``prefixed``: give the backbone its instruction prefix instead of relying on an adapter.
    """
    inputs, targets, rows = [], [], []
    for index, task in enumerate(tasks):
        for text, target in examples(task, n, seed):
            inputs.append(with_prefix(task, text) if prefixed else text)
            targets.append(target)
            rows.append(task_ids[index] if task_ids is not None else 0)
    predictions = greedy_decode(model, inputs, rows if task_ids is not None else None)
    scores = {}
    for index, task in enumerate(tasks):
        part = slice(index * n, (index + 1) * n)
        scores[task] = exact_match(predictions[part], targets[part])
    return scores


def mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / max(1, len(scores))
