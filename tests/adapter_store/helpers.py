"""What several adapter_store tests need: random routing logits for a store's inventory, adapter equality."""

import torch


def random_logits(store, seed=0):
    """One logits row per module of each group, random (seeded), shaped as the store's inventory routes."""
    gen = torch.Generator().manual_seed(seed)
    width = store.inventory.config.n_splits * store.inventory.config.n_skills
    return [torch.randn(len(g.names), width, generator=gen) for g in store.inventory.groups]


def same_adapter(first, second):
    """Every layer's A and B equal, exactly."""
    return all(torch.equal(a1, a2) and torch.equal(b1, b2)
               for (_, a1, b1), (_, a2, b2) in zip(first.layers(), second.layers(), strict=True))
