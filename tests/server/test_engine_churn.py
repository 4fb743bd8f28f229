"""The engine core under churn: a seeded random mix of greedy, seeded-sampling, beam-search and stop-string requests,
half of them behind one long shared prompt prefix, arriving while others run, some cancelled while they wait or
decode, through a KV pool small enough that rows are preempted and computed again. Every request that was not
cancelled answers exactly what the same request answers alone on a roomy engine, and once everything ended no block
is held (each is free, or cached for a prefix)."""

from __future__ import annotations

import random

import pytest

from adapter_store import AdapterCache, AdapterStore
from server.engine import Engine, GenerateRow, SamplingParams, load_model
from tests.factories import save_bundle

PREFIX = "You are a careful assistant. Answer in one short line: "  # 55 bytes: three blocks of 16 and a partial one
TEXTS = ["hello there", "abc", "a longer input text", "xyz!", "mid"]
REQUESTS = 24


def engine_for(folder, **options) -> Engine:
    return Engine(load_model(folder / "model", device="cpu"), AdapterStore.open(folder / "inventory"),
                  AdapterCache(10**8), **options)


def _params(rng: random.Random) -> SamplingParams:
    new = rng.randint(8, 96)
    kind = rng.choice(["greedy", "seeded", "beams", "stop"])
    if kind == "seeded":
        return SamplingParams(max_new_tokens=new, ignore_eos=True, do_sample=True, temperature=0.9,
                              seed=rng.randrange(10**6))
    if kind == "beams":
        return SamplingParams(max_new_tokens=new // 3, ignore_eos=True, num_beams=rng.choice([2, 3]))
    if kind == "stop":
        return SamplingParams(max_new_tokens=new, stop=(rng.choice("aeiou"),))
    return SamplingParams(max_new_tokens=new, ignore_eos=True)


def _requests(rng: random.Random) -> list[GenerateRow]:
    return [GenerateRow(f"task-{rng.randrange(3)}",
                        (PREFIX if rng.random() < 0.5 else "") + rng.choice(TEXTS) + f" {i}", _params(rng))
            for i in range(REQUESTS)]


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("beams", [1, 3])
def test_a_request_larger_than_the_whole_pool_fails_alone_and_the_loop_serves_on(tmp_path, kind, beams):
    save_bundle(tmp_path, kind)
    engine = engine_for(tmp_path, max_batch_tokens=64)  # a few blocks of 16
    running = engine.submit_generate([GenerateRow("task-0", "short", SamplingParams(max_new_tokens=30))])
    huge = GenerateRow("task-1", "x" * 400, SamplingParams(max_new_tokens=4, num_beams=beams))
    with pytest.raises(ValueError, match="KV cache cannot hold this request.*MHR_KV_CACHE_BYTES"):
        engine.generate([huge])
    assert running.future.result(timeout=60)[0].completion_tokens > 0  # the running row went on
    after = engine.generate([GenerateRow("task-2", "abc", SamplingParams(max_new_tokens=5))])
    assert after[0].completion_tokens > 0
    assert engine.loop.batch.kv.blocks.used == 0
    engine.close()
