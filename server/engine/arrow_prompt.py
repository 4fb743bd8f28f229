"""Arrow routed once per request (`granularity: "prompt"`): each adapted layer's mix over its library is fixed from
the prompt, then applied to every token of the request, prompt and generated.

    s_l = mean over the prompt's tokens t of |x_l,t · p_j| / temperature   (J,)   x_l,t: layer l's input under the
                                                                                  bare backbone (a routing pass)
    w_l = softmax over the top_k of s_l (others 0)
    A_l = Σ_j w_l,j A_j,   B_l = Σ_j w_l,j B_j      the mix is of parameters, as MHR mixes skills: a plain rank-r LoRA
With top_k = 1 this is exactly the chosen expert's LoRA (mixing parameters or outputs agree there).
The routing pass is one forward of the bare backbone over the prompts (a seq2seq model: its encoder and one decoder
step from the start token, so the decoder's own layers read that token and its cross-attention's k and v the
encoder's states). The row then runs as any routed task would (merged, in the row pool, static steps and graphs),
under a key naming the route and the prompt: equal prompts share one adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import torch

from adapter_store import LayerGroup, TaskAdapter

from .adapter_slots import AdapterSlots
from .arrow_layer import top_k_softmax
from .arrow_rows import ArrowAdapter, ArrowKey, is_arrow
from .loader import LoadedModel


class PromptRouteKey(NamedTuple):
    """Names a prompt-routed row's adapter: the Arrow route (library content and spec) and the prompt's tokens."""

    arrow: ArrowKey
    prompt: tuple[int, ...]


class PromptRoute(NamedTuple):
    adapter: TaskAdapter  # the fixed mix, a plain LoRA
    key: PromptRouteKey
    layers: dict[str, torch.Tensor]  # module path -> w_l (J,)

    def average(self) -> torch.Tensor:
        """w averaged over the layers (J,)."""
        return torch.stack(list(self.layers.values())).float().mean(0).cpu()


def routes_once(adapter: TaskAdapter | None) -> bool:
    """An Arrow row whose route is fixed once per request from its prompt."""
    return is_arrow(adapter) and adapter.spec.granularity == "prompt"


def prompt_forward(m: LoadedModel, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
    """A plain forward over prompts (M, Q), outside the serving loop's KV pool: T5 runs its encoder and one decoder
    step from the start token."""
    if not m.is_seq2seq:
        m.model(input_ids=input_ids, attention_mask=mask, logits_to_keep=1)
        return
    start = torch.full((input_ids.shape[0], 1), m.model.config.decoder_start_token_id, dtype=torch.long,
                       device=input_ids.device)
    m.model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=start)


def layer_scores(m: LoadedModel, slots: AdapterSlots, adapter: ArrowAdapter, prompts: Sequence[Sequence[int]]
                 ) -> dict[str, torch.Tensor]:
    """s_l for each prompt: module path -> (M, J), the mean of |x·p_j| / temperature over the tokens each layer
    read in one bare forward (the prompt's tokens, masked; a seq2seq decoder's layers: its start token)."""
    width = max(len(ids) for ids in prompts)
    pad = m.tokenizer.pad_token_id or 0
    ids = torch.tensor([list(p) + [pad] * (width - len(p)) for p in prompts], dtype=torch.long, device=m.device)
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], dtype=torch.long, device=m.device)
    scores: dict[str, torch.Tensor] = {}
    experts = len(adapter.library.experts)

    def hook(name: str):
        def read(_module, args) -> None:
            x = args[0]  # (M, T, d_in)
            fused = adapter.layer_weights[name].fused
            sims = (x @ fused[:, :experts].to(x.dtype)).abs().float()  # (M, T, J): |x·p_j| / temperature
            if sims.shape[1] == width:
                keep = mask[..., None].float()
                scores[name] = (sims * keep).sum(1) / keep.sum(1).clamp(min=1)
            else:
                scores[name] = sims.mean(1)
        return read

    handles = [slots.layers[name].register_forward_pre_hook(hook(name)) for name in adapter.layer_weights]
    try:
        with slots.activate([None]), torch.inference_mode():
            prompt_forward(m, ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    return scores


def mixed_adapter(adapter: ArrowAdapter, weights: dict[str, torch.Tensor]) -> TaskAdapter:
    """The plain LoRA of one request's fixed mix: per layer A = Σ_j w_j A_j, B = Σ_j w_j B_j (w: path -> (J,))."""
    library = adapter.library
    groups = []
    for group in library.groups:
        w = torch.stack([weights[name] for name in group.names]).to(group.lora_a.dtype)  # (L, J)
        a = torch.einsum("lj,ljdr->ldr", w, group.lora_a)
        b = torch.einsum("lj,ljro->lro", w, group.lora_b)
        groups.append(LayerGroup(group.names, a, b))
    return TaskAdapter(library.rank, library.scale, tuple(groups))


def route_prompts(m: LoadedModel, slots: AdapterSlots, adapter: ArrowAdapter, prompts: Sequence[Sequence[int]]
                  ) -> list[PromptRoute]:
    """Each prompt's fixed mix under `adapter`'s route, from one bare forward over them all. The layers are left
    bare (slots.applied None: the running batch re-points them)."""
    top_k = adapter.spec.k_of(len(adapter.library.experts))
    scores = layer_scores(m, slots, adapter, prompts)
    routes = []
    for i, prompt in enumerate(prompts):
        layers = {name: top_k_softmax(s[i], top_k) for name, s in scores.items()}
        routes.append(PromptRoute(mixed_adapter(adapter, layers), PromptRouteKey(adapter.key, tuple(prompt)), layers))
    return routes


def route_rows(m: LoadedModel, slots: AdapterSlots, rows: Sequence) -> None:
    """Rows about to be prefilled whose adapter routes once per request get their fixed mix as a plain adapter (and
    its key, and their `routing`: each expert's weight averaged over the layers); one routing pass per route."""
    by_route: dict[Hashable, list] = {}
    for row in rows:
        if routes_once(row.adapter):
            by_route.setdefault(row.adapter.key, []).append(row)
    for group in by_route.values():
        adapter = group[0].adapter
        for row, route in zip(group, route_prompts(m, slots, adapter, [row.prompt_ids for row in group]),
                              strict=True):
            row.adapter, row.key = route.adapter, route.key
            row.routing = adapter.experts_weights(route.average())


def route_pairs(m: LoadedModel, slots: AdapterSlots, pairs: list[tuple], token_ids: Callable[[str], list[int]]
                ) -> list[tuple]:
    """/score's pairs [(text, choice, adapter, key)]: those whose route is fixed once per request get their text's
    fixed mix and its key (one routing pass per route); the others are as they came."""
    by_route: dict[Hashable, list[int]] = {}
    for i, (_, _, adapter, _) in enumerate(pairs):
        if routes_once(adapter):
            by_route.setdefault(adapter.key, []).append(i)
    pairs = list(pairs)
    for members in by_route.values():
        adapter = pairs[members[0]][2]
        routes = route_prompts(m, slots, adapter, [token_ids(pairs[i][0]) for i in members])
        for i, route in zip(members, routes, strict=True):
            pairs[i] = (pairs[i][0], pairs[i][1], route.adapter, route.key)
    return pairs
