"""The logits LRU: bounded by bytes, least recently used out first."""

import torch

from adapter_store.lru import TensorsLRU


def floats(n: int) -> list[torch.Tensor]:
    return [torch.zeros(n)]  # 4 * n bytes


def test_evicts_least_recently_used_by_bytes():
    lru = TensorsLRU(capacity_bytes=3 * 40)
    for key in "abc":
        lru.put(key, floats(10))
    assert lru.get("a") is not None  # a is now the most recent; b the least
    lru.put("d", floats(10))
    assert lru.get("b") is None and all(lru.get(k) is not None for k in "acd")
    lru.put("big", floats(20))  # 80 bytes: two more go
    assert len(lru) == 2 and lru.get("big") is not None


def test_a_value_larger_than_the_capacity_is_not_kept_and_replacing_a_key_frees_its_bytes():
    lru = TensorsLRU(capacity_bytes=40)
    lru.put("huge", floats(11))
    assert lru.get("huge") is None and len(lru) == 0
    lru.put("a", floats(10))
    lru.put("a", floats(5))
    lru.put("b", floats(5))
    assert lru.get("a")[0].numel() == 5 and lru.get("b") is not None
