"""Choose each row's next token with its own parameters: greedy and sampled rows in one batch.

    greedy row:   argmax(logits)
    sampled row:  logits / temperature -> keep the top_k largest (0: all) -> keep the smallest set whose
                  probability reaches top_p -> draw from the row's own torch.Generator
    every row:    end-of-sequence is forbidden while it has fewer than min_new_tokens
The order temperature -> top-k -> top-p is transformers' (its logits warpers). A seeded row's generator is
seeded from (seed, row index in its request), so its draws never depend on what else shares the batch.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from .rows import SamplingParams

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
