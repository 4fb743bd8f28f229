"""What decoding steps keep of their gathered keys (server/engine/kept_gathers.py): T5's cross-attention gathers per
layer and group, until cleared, within their budget; what is in use is never dropped for a new copy, and what was not
used for a round of lookups makes room."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from server.engine.kept_gathers import CrossGathers


def _gather(calls: list, elements: int = 4):
    def gather():
        calls.append(elements)
        return torch.zeros(elements), torch.zeros(elements)  # 2 x 4 bytes per element
    return gather


def test_what_is_in_use_is_never_dropped_and_what_is_not_makes_room():
    calls = []
    groups = [SimpleNamespace(key=(name,)) for name in "abc"]
    kept = CrossGathers(max_bytes=64)  # room for two copies of 32 bytes
    for _ in range(3):  # a and b in use every step, c too: c finds no room and gathers every time
        for group in groups:
            kept.get(0, group, _gather(calls))
    assert len(calls) == 2 + 3
    for _ in range(4):  # a leaves; b and c go on: c takes a's room once a is a round of lookups old
        for group in groups[1:]:
            kept.get(0, group, _gather(calls))
    before = len(calls)
    for group in groups[1:]:
        kept.get(0, group, _gather(calls))
    assert len(calls) == before  # both kept now


def test_cross_gathers_are_kept_per_layer_and_group_until_cleared_and_within_their_budget():
    calls = []

    def gather(elements: int = 4):
        calls.append(elements)
        return torch.zeros(elements), torch.zeros(elements)  # 2 x 4 bytes per element

    group_a, group_b = SimpleNamespace(key=("a",)), SimpleNamespace(key=("b",))
    kept = CrossGathers(max_bytes=100)
    first = kept.get(0, group_a, gather)
    assert kept.get(0, group_a, gather) is first and len(calls) == 1
    kept.get(1, group_a, gather)
    kept.get(0, group_b, gather)
    assert len(calls) == 3  # one per layer and group
    kept.clear()
    kept.get(0, group_a, gather)
    assert len(calls) == 4
    kept.get(2, group_a, lambda: gather(16))  # 128 bytes: over the budget, never kept
    kept.get(2, group_a, lambda: gather(16))
    assert len(calls) == 6
    kept.get(0, group_a, gather)
    assert len(calls) == 6  # what was kept is still there
