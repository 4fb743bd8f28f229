"""The log-probabilities of prompts' own tokens (OpenAI's `echo` with `logprobs`), as one call on the serving loop.

    prompt_token_logprobs(engine, task, prompts, k)  ->  per prompt, per token: log P(token | tokens before it)
                                                         and the k most likely tokens, with the task's adapter
Causal LMs only: a seq2seq model's prompt is its encoder's input, which it does not predict.
"""

from __future__ import annotations

from adapter_store import TaskRef

from .rows import TokenLogprob
from .scoring import prompt_logprobs


def prompt_token_logprobs(engine, task: TaskRef, prompts: list[list[int]], top_k: int) -> list[list[TokenLogprob]]:
    """Blocks until the serving loop ran the forward between two of its iterations (call it off the loop)."""
    if engine.loaded.is_seq2seq:
        raise ValueError("a seq2seq model's prompt is its encoder's input: it has no log-probabilities")

    def run() -> list[list[TokenLogprob]]:
        adapters, keys = engine.adapters_and_keys([task])
        with engine.slots.activate(adapters, key=keys[0]):
            pad_id = engine.tokenizer.pad_token_id or 0  # padding is masked: any id will do
            return prompt_logprobs(engine.model, engine.loaded.device, prompts, top_k, pad_id)

    return engine.loop.call(run)
