"""Choose each row's next token with its own parameters: greedy and sampled rows in one batch.

    greedy row:   argmax(logits)
    sampled row:  logits / temperature -> keep the top_k largest (0: all) -> keep the smallest set whose
                  probability reaches top_p -> draw from the row's own torch.Generator
    every row:    end-of-sequence is forbidden while it has fewer than min_new_tokens
    guided row:   tokens its grammar does not allow next are masked (-inf) before choosing (guided.py)
    logprobs=k:   log_softmax(raw logits)[chosen] and its k largest entries (the model's own distribution, before
                  temperature, top-k, top-p and the min_new_tokens rule: vLLM's raw log-probabilities)
The order temperature -> top-k -> top-p is transformers' (its logits warpers). A seeded row's generator is
seeded from (seed, row index in its request), so its draws never depend on what else shares the batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import torch

from .rows import SamplingParams, TokenLogprob

SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads (seed, index) pairs over the generator's seed space


def row_generator(params: SamplingParams, index: int) -> torch.Generator | None:
    """A row's own random stream: seeded rows repeat, unseeded ones draw a fresh seed. None for greedy rows."""
    if not params.do_sample:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(62)
    return torch.Generator().manual_seed((seed + index * SEED_STRIDE) % 2**63)


@dataclass
class RowChoice:
    """What the sampler needs of one active row."""

    params: SamplingParams
    generator: torch.Generator | None
    generated: int  # tokens generated so far
    guide: Any = None  # a RowGuide for a guided row (guided.py)


def choose(logits: torch.Tensor, rows: list[RowChoice], eos_ids: frozenset[int]
           ) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
    """logits (N, V) -> the next token of every row (N,) on the CPU, and the log-probability entry of each row
    whose params ask for one (None for the others)."""
    asked = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    logprobs = torch.log_softmax(logits[asked].float(), dim=-1).cpu() if asked else None  # (A, V), before masks
    _mask_guided(logits, rows, eos_ids)
    tokens = next_tokens(logits, rows, eos_ids)
    entries: list[TokenLogprob | None] = [None] * len(rows)
    if asked:
        found = logprob_entries(logprobs, tokens[asked], max(rows[i].params.logprobs for i in asked))
        for i, entry in zip(asked, found, strict=True):
            entries[i] = TokenLogprob(entry.token, entry.logprob, entry.top[: rows[i].params.logprobs])
    return tokens, entries


def _mask_guided(logits: torch.Tensor, rows: list[RowChoice], eos_ids: frozenset[int]) -> None:
    """logits (N, V), in place: -inf at the tokens each guided row's grammar does not allow next."""
    for i, row in enumerate(rows):
        if row.guide is not None:
            allowed = row.guide.allowed(logits.shape[1], eos_ids).to(logits.device)  # (V,)
            logits[i].masked_fill_(~allowed, -float("inf"))


def logprob_entries(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logprobs (T, V) and the token at each position (T,) -> per position: that token's log-probability and the
    k most likely tokens, best first."""
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)  # (T,)
    values, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)  # (T, k), descending
    return [TokenLogprob(token, logprob, tuple(zip(top_ids, top_values, strict=True)))
            for token, logprob, top_ids, top_values in zip(tokens.tolist(), chosen.tolist(), ids.tolist(),
                                                           values.tolist(), strict=True)]


def next_tokens(logits: torch.Tensor, rows: list[RowChoice], eos_ids: frozenset[int]) -> torch.Tensor:
    """logits (N, V) -> the next token of every row (N,) on the CPU."""
    logits = logits.float()
    early = [i for i, row in enumerate(rows) if row.generated < row.params.min_new_tokens]
    if early and eos_ids:
        logits[torch.tensor(early)[:, None], torch.tensor(sorted(eos_ids))[None, :]] = -float("inf")
    tokens = logits.argmax(dim=-1).cpu()  # (N,)
    sampled = [i for i, row in enumerate(rows) if row.params.do_sample]
    if sampled:
        tokens[sampled] = _sample(logits[sampled].cpu(), [rows[i] for i in sampled])
    return tokens


def _sample(logits: torch.Tensor, rows: list[RowChoice]) -> torch.Tensor:
    """logits (S, V) of the sampled rows -> one token each (S,)."""
    temperature = torch.tensor([row.params.temperature for row in rows])[:, None]  # (S, 1)
    ranked, order = torch.sort(logits / temperature, dim=-1, descending=True)  # (S, V)
    vocab = ranked.shape[1]
    top_k = torch.tensor([row.params.top_k or vocab for row in rows])[:, None]  # (S, 1)
    ranked = ranked.masked_fill(torch.arange(vocab)[None, :] >= top_k, -float("inf"))
    probs = torch.softmax(ranked, dim=-1)  # (S, V)
    top_p = torch.tensor([row.params.top_p for row in rows])[:, None]
    before = probs.cumsum(dim=-1) - probs  # probability of the higher-ranked tokens
    probs = probs.masked_fill(before >= top_p, 0.0)  # the first token always stays
    picks = [torch.multinomial(probs[i], 1, generator=row.generator) for i, row in enumerate(rows)]
    return order.gather(1, torch.stack(picks)).squeeze(1)  # (S,)
