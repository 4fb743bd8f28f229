"""The adapter cache: LRU by bytes, counters, versioned keys, device/dtype, single-flight misses."""

import threading
import time

import pytest
import torch

from adapter_store import AdapterCache, LayerGroup, TaskAdapter


def adapter(n_floats: int, value: float = 1.0) -> TaskAdapter:
    """An adapter of exactly 4 * n_floats bytes in float32."""
    a = torch.full((1, n_floats // 2, 1), value)
    b = torch.full((1, 1, n_floats // 2), value)
    return TaskAdapter(1, 1.0, (LayerGroup(("m",), a, b),))


def test_lru_evicts_by_bytes_not_entries():
    cache = AdapterCache(capacity_bytes=3 * 400)
    for name in "abc":
        cache.get(name, lambda: adapter(100))
    cache.get("a", lambda: pytest.fail("a must be a hit"))  # a is now most recent; b is least
    cache.get("d", lambda: adapter(100))
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "acd" if k in cache}
    cache.get("big", lambda: adapter(200))  # needs 800 bytes: evicts two more
    stats = cache.stats()
    assert stats.evictions == 3 and stats.bytes <= 1200 and stats.entries == 2
    assert (stats.hits, stats.misses) == (1, 5)


def test_entry_larger_than_capacity_is_returned_but_not_kept():
    cache = AdapterCache(capacity_bytes=100)
    result = cache.get("huge", lambda: adapter(1000))
    assert result.nbytes == 4000 and "huge" not in cache and cache.stats().bytes == 0


def test_new_version_is_a_new_key():
    cache = AdapterCache(capacity_bytes=10_000)
    first = cache.get(("fp", "task", 1), lambda: adapter(10, 1.0))
    second = cache.get(("fp", "task", 2), lambda: adapter(10, 2.0))
    assert not torch.equal(first.groups[0].lora_a, second.groups[0].lora_a)


def test_converts_to_the_cache_dtype():
    cache = AdapterCache(capacity_bytes=10_000, dtype=torch.bfloat16)
    result = cache.get("t", lambda: adapter(10))
    assert result.groups[0].lora_a.dtype == torch.bfloat16 and result.nbytes == 20


def test_concurrent_misses_compute_once():
    cache = AdapterCache(capacity_bytes=10_000)
    calls = []
    start = threading.Barrier(8)

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return adapter(10)

    results = []

    def worker():
        start.wait()
        results.append(cache.get("same", slow))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 8
    assert all(r is results[0] for r in results)
    assert cache.stats().misses == 1 and cache.stats().hits == 7


def test_failed_computation_reaches_every_waiter_and_is_not_cached():
    cache = AdapterCache(capacity_bytes=10_000)

    def boom():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.get("x", boom)
    assert cache.get("x", lambda: adapter(10)).nbytes == 40


def test_discard_drops_matching_entries():
    cache = AdapterCache(capacity_bytes=10_000)
    cache.get(("fp", "a", 1), lambda: adapter(10))
    cache.get(("fp", "b", 1), lambda: adapter(10))
    assert cache.discard(lambda key: key[1] == "a") == 1
    assert ("fp", "a", 1) not in cache and cache.stats().bytes == 40


def test_get_many_computes_the_misses_together_once():
    cache, calls = AdapterCache(capacity_bytes=10_000), []

    def compute_many(keys):
        calls.append(list(keys))
        return [adapter(10, float(ord(k))) for k in keys]

    cache.get("a", lambda: adapter(10, 0.5))
    got = cache.get_many(["b", "a", "c", "b"], compute_many)
    assert calls == [["b", "c"]]  # a was a hit; b asked twice is computed once
    assert [g.groups[0].lora_a.flatten()[0].item() for g in got] == [ord("b"), 0.5, ord("c"), ord("b")]
    assert got[0] is got[3] and "c" in cache
    assert cache.get_many(["c", "b"], lambda keys: pytest.fail("all hits")) == [got[2], got[0]]


def test_get_many_waits_for_a_miss_another_thread_is_computing():
    cache, started, release = AdapterCache(capacity_bytes=10_000), threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(5)
        return adapter(10, 7.0)

    worker = threading.Thread(target=lambda: cache.get("a", slow))
    worker.start()
    started.wait(5)
    result = {}
    other = threading.Thread(target=lambda: result.update(got=cache.get_many(["a", "b"], lambda k: [adapter(10)])))
    other.start()
    time.sleep(0.05)
    release.set()
    worker.join(5), other.join(5)
    assert result["got"][0].groups[0].lora_a.flatten()[0].item() == 7.0 and cache.stats().misses == 2


def test_get_many_failure_reaches_every_waiter_and_leaves_nothing_behind():
    cache = AdapterCache(capacity_bytes=10_000)

    def broken(keys):
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        cache.get_many(["a", "b"], broken)
    assert "a" not in cache and cache.get_many(["a"], lambda keys: [adapter(10)])[0].nbytes == 40
