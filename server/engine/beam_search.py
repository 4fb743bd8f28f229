"""Beam search for one request, step by step inside the serving loop: its beams are rows of the running batch.

The selection is transformers' own (`GenerationMixin._beam_search`, 5.x) for one input, so the text equals
`model.generate(num_beams=k)` on the same adapter:

    each step, given the log-probabilities of the k running beams (k, V):
        scores   = running_scores[:, None] + log_probs                   (k, V) -> flattened (k·V,)
        top      = the best max(2, 1 + #eos)·k continuations
        finished = those ending in end-of-sequence or reaching max_new_tokens; the first k of `top` that finished
                   join the finished hypotheses, scored sum / generated^length_penalty (best k kept)
        running  = the best k of `top` that did not finish: each names its parent beam and its new token
    the search ends when no running beam can beat the worst finished one (transformers' heuristic with
    early_stopping=False), when every continuation finished, or at max_new_tokens; the answer is the best finished
    hypothesis (or the best running beam).
The loop moves each beam's cache to follow its parent (`parents`), as generate's `_reorder_cache` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG = -1.0e9


@dataclass
class BeamStep:
    parents: list[int]  # new beam i continues old beam parents[i]
    tokens: list[int]  # new beam i's token


class BeamSearch:
    def __init__(self, num_beams: int, max_new_tokens: int, eos_ids: frozenset[int], *, length_penalty: float = 1.0):
        self.k = num_beams
        self.max_new_tokens = max_new_tokens
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self.length_penalty = length_penalty
        self.keep = max(2, 1 + len(eos_ids)) * num_beams
        self.generated = 0  # tokens each running beam has
        self.running = torch.zeros((num_beams, max_new_tokens), dtype=torch.long)  # (k, T) tokens so far
        self.running_scores = torch.full((num_beams,), NEG)
        self.running_scores[0] = 0.0  # the k beams start as copies: only the first one may be continued
        self.finished = torch.zeros((num_beams, max_new_tokens), dtype=torch.long)
        self.finished_lengths = torch.zeros(num_beams, dtype=torch.long)
        self.finished_scores = torch.full((num_beams,), NEG)
        self.is_finished = torch.zeros(num_beams, dtype=torch.bool)
        self.improvable = True
        self.done = False

    def step(self, log_probs: torch.Tensor) -> BeamStep:
        """log_probs (k, V) of the running beams' next token (end-of-sequence already forbidden where it must
        be) -> each new beam's parent and token. Sets `done` when the search has ended."""
        vocab = log_probs.shape[1]
        totals = (log_probs.float() + self.running_scores[:, None]).reshape(-1)  # (k·V,)
        top_scores, top_index = torch.topk(totals, k=self.keep)  # (K,)
        parents, tokens = top_index // vocab, top_index % vocab
        candidates = self.running[parents]  # (K, T): a copy, each candidate's parent's tokens
        candidates[:, self.generated] = tokens  # and its new one
        hits_end = torch.isin(tokens, self.eos) | (self.generated + 1 >= self.max_new_tokens)  # (K,)
        self._collect_finished(candidates, top_scores, hits_end)
        alive = top_scores + hits_end.float() * NEG
        chosen = torch.topk(alive, k=self.k).indices  # (k,)
        self.running = candidates[chosen]
        self.running_scores = alive[chosen]
        self.generated += 1
        self._check_end(hits_end)
        return BeamStep(parents[chosen].tolist(), tokens[chosen].tolist())

    def _collect_finished(self, candidates: torch.Tensor, scores: torch.Tensor, hits_end: torch.Tensor) -> None:
        """The first k candidates that just finished join the finished hypotheses (the best k are kept)."""
        top_k = torch.arange(self.keep) < self.k
        just_finished = hits_end & top_k  # (K,)
        penalised = scores / ((self.generated + 1) ** self.length_penalty)
        penalised = penalised + (~just_finished).float() * NEG + (0.0 if self.improvable else NEG)
        merged_scores = torch.cat([self.finished_scores, penalised])  # (k + K,)
        merged = torch.cat([self.finished, candidates])
        merged_lengths = torch.cat([self.finished_lengths, torch.full((self.keep,), self.generated + 1)])
        merged_flags = torch.cat([self.is_finished, just_finished])
        best = torch.topk(merged_scores, k=self.k).indices
        self.finished, self.finished_scores = merged[best], merged_scores[best]
        self.finished_lengths, self.is_finished = merged_lengths[best], merged_flags[best]

    def _check_end(self, hits_end: torch.Tensor) -> None:
        """transformers' early-stop heuristic (early_stopping=False) and its other stopping conditions."""
        best_running = self.running_scores[0] / (self.generated ** self.length_penalty)
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(), NEG)  # (k,): NEG for open slots
        self.improvable = self.improvable and bool((best_running > worst_finished).any())
        self.done = not self.improvable or bool(hits_end.all()) or self.generated >= self.max_new_tokens

    def best(self) -> tuple[list[int], bool]:
        """The answer's generated tokens (its end-of-sequence token excluded) and whether it ended by one."""
        if bool(self.is_finished[0]):
            tokens = self.finished[0, : int(self.finished_lengths[0])].tolist()
        else:
            tokens = self.running[0, : self.generated].tolist()
        if tokens and tokens[-1] in set(self.eos.tolist()):
            return tokens[:-1], True
        return tokens, False
