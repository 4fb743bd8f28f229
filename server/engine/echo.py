"""The log-probabilities of prompts' own tokens (OpenAI's `echo` with `logprobs`), as calls on the serving loop.

    prompt_token_logprobs(engine, task, prompts, k)  ->  per prompt, per token: log P(token | tokens before it)
                                                         and the k most likely tokens, with the task's adapter
The prompts go in chunks of the loop's row limit, one forward each between its iterations (as /score's chunks), so
generation goes on in between. Causal LMs only: a seq2seq model's prompt is its encoder's input, which it does not
predict.
"""

from __future__ import annotations

from adapter_store import TaskRef

from .rows import TokenLogprob
from .scoring import prompt_logprobs


def prompt_token_logprobs(engine, task: TaskRef, prompts: list[list[int]], top_k: int) -> list[list[TokenLogprob]]:
    """Blocks until the serving loop has run every chunk (call it off the loop)."""
    if engine.loaded.is_seq2seq:
        raise ValueError("a seq2seq model's prompt is its encoder's input: it has no log-probabilities")
    chunk = max(1, engine.loop.max_rows)
    out: list[list[TokenLogprob]] = []
    for start in range(0, len(prompts), chunk):
        out += engine.loop.call(lambda part=prompts[start: start + chunk]: _run(engine, task, part, top_k))
    return out


def _run(engine, task: TaskRef, prompts: list[list[int]], top_k: int) -> list[list[TokenLogprob]]:
    """On the loop thread: one teacher-forced forward with the task's adapter."""
    adapters, keys = engine.adapters_and_keys([task])
    pad_id = engine.tokenizer.pad_token_id or 0  # padding is masked: any id will do
    with engine.slots.activate(adapters, key=keys[0]):
        return prompt_logprobs(engine.model, engine.loaded.device, prompts, top_k, pad_id)
