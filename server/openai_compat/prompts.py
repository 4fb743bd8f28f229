"""/v1/completions' `prompt`: a text, texts, token ids or lists of token ids -> what each row reads, checked.

A text is tokenised as /generate tokenises its inputs (with the tokenizer's special tokens); token ids are read as
given (nothing added), each 0 <= id < the model's vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..routes.validation import invalid


@dataclass(frozen=True)
class PromptIn:
    text: str  # a text prompt as sent; token ids decoded (special tokens left out)
    ids: list[int]  # what the model reads


def prompts_of(prompt: str | list[str] | list[int] | list[list[int]], engine, settings) -> list[PromptIn]:
    """Each prompt with its token ids; 422 naming `prompt` (or `prompt.i` in a list) for one that is too long or
    holds an id outside the vocabulary."""
    single = isinstance(prompt, str) or isinstance(prompt[0], int)
    items = [prompt] if single else list(prompt)
    if len(items) > settings.max_inputs_per_request:
        raise invalid("prompt", f"{len(items)} prompts; at most {settings.max_inputs_per_request} per request")
    vocab = engine.model.config.get_text_config().vocab_size
    out = []
    for i, item in enumerate(items):
        where = "prompt" if single else f"prompt.{i}"
        out.append(_text_prompt(item, engine) if isinstance(item, str) else _id_prompt(item, vocab, engine, where))
        if len(out[-1].ids) > settings.max_input_tokens:
            raise invalid(where, f"{len(out[-1].ids)} tokens; at most max_input_tokens={settings.max_input_tokens}")
    return out


def _text_prompt(text: str, engine) -> PromptIn:
    return PromptIn(text, engine.token_ids(text))


def _id_prompt(ids: list[int], vocab: int, engine, where: str) -> PromptIn:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid(where, f"token id {bad} is outside the vocabulary (0 <= id < {vocab})")
    return PromptIn(engine.tokenizer.decode(ids, skip_special_tokens=True), list(ids))
