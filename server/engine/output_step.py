"""The one place where a forward's logits become tokens for the rows that ran it.

    free rows (ActiveRow):   each row's sampler (greedy or its own sampling parameters, a guided row's grammar mask,
                             its log-probabilities where asked: sampling.py), then ActiveRow.accept: end of
                             sequence, its max_new_tokens, a stop string -> ended; else the streamable text goes
                             to its callback
    beam rows (BeamRow):     each beam group's search picks its beams' tokens and parents (beam_rows.py); the
                             group's rows end together when the search has ended
Returns the rows that ended and, when beams changed parents, the cache order the batch must take:
order[p] = the position whose cache row p continues (identity elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .beam_rows import BeamGroup, BeamRow
from .sampling import choose
from .sequence import ActiveRow


@dataclass
class StepOutput:
    ended: list = field(default_factory=list)  # rows that ended (beam groups: all their rows)
    order: list[int] | None = None  # cache rows to take (None: unchanged)


def apply(rows: list, logits: torch.Tensor, eos_ids: frozenset[int]) -> StepOutput:
    """rows: the rows that ran, in batch order; logits (N, V): each row's next-token logits."""
    out = StepOutput()
    free = [i for i, row in enumerate(rows) if isinstance(row, ActiveRow)]
    if free:
        with torch.inference_mode():
            tokens, logprobs = choose(logits[free] if len(free) < len(rows) else logits, [rows[i] for i in free],
                                      eos_ids)
        for i, token, logprob in zip(free, tokens.tolist(), logprobs, strict=True):
            row = rows[i]
            if row.accept(token, eos_ids, logprob):
                out.ended.append(row)
            else:
                row.stream()
    groups = _beam_groups(rows)
    if groups:
        out.order = list(range(len(rows)))
        for group, positions in groups.items():
            step = group.advance(logits[positions])  # (k, V)
            for beam, parent in enumerate(step.parents):
                out.order[positions[beam]] = positions[parent]
            if group.done:
                out.ended += group.rows
        if out.order == list(range(len(rows))):
            out.order = None
    return out


def _beam_groups(rows: list) -> dict[BeamGroup, list[int]]:
    """Each beam group of the batch and the positions of its rows, in beam order."""
    groups: dict[BeamGroup, list[int]] = {}
    for position, row in enumerate(rows):
        if isinstance(row, BeamRow):
            groups.setdefault(row.group, [0] * len(row.group.rows))[row.beam] = position
    return groups
