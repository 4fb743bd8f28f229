"""The bytes-bounded LRU behind the adapter cache and the logits cache."""

from adapter_store.lru import BytesLRU


def test_evicts_least_recently_used_by_bytes():
    lru = BytesLRU(capacity_bytes=3 * 40)
    for key in "abc":
        lru.put(key, key.upper(), 40)
    assert lru.get("a") == "A"  # a is now the most recent; b the least
    lru.put("d", "D", 40)
    assert lru.get("b") is None and all(lru.get(k) is not None for k in "acd")
    lru.put("big", "BIG", 80)  # two more go
    assert len(lru) == 2 and lru.get("big") == "BIG" and lru.evictions == 3 and lru.bytes == 120


def test_a_value_larger_than_the_capacity_is_not_kept_and_replacing_a_key_frees_its_bytes():
    lru = BytesLRU(capacity_bytes=40)
    lru.put("huge", "x", 44)
    assert lru.get("huge") is None and len(lru) == 0
    lru.put("a", "long", 40)
    lru.put("a", "short", 20)
    lru.put("b", "b", 20)
    assert lru.get("a") == "short" and lru.get("b") == "b" and lru.bytes == 40


def test_discard_by_key_predicate():
    lru = BytesLRU(capacity_bytes=100)
    for key in ("x1", "x2", "y1"):
        lru.put(key, key, 10)
    assert lru.discard(lambda key: key.startswith("x")) == 2 and "y1" in lru and lru.bytes == 10
