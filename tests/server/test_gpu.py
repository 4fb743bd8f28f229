"""CUDA paths: device placement, bf16/fp16, adapter cache memory. Skipped without a GPU."""

import json
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from adapter_store import AdapterCache, AdapterStore
from server.app import create_app
from server.engine import Engine, GenerateRow, SamplingParams, ScoreRow, load_model
from tests.factories import save_bundle
from tests.server.conftest import bundle_settings

pytestmark = pytest.mark.gpu


def engine_on(folder, device, dtype, cache_bytes=10**8):
    loaded = load_model(folder / "model", device=device, dtype=dtype)
    cache = AdapterCache(cache_bytes, loaded.device, loaded.dtype)
    return Engine(loaded, AdapterStore.open(folder / "inventory"), cache)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_scores_match_cpu(t5_bundle, dtype):
    cpu = engine_on(t5_bundle, "cpu", "float32")
    gpu = engine_on(t5_bundle, "cuda", dtype)
    assert next(gpu.model.parameters()).device.type == "cuda"
    rows = [ScoreRow("alpha", "some input", ["yes", "no"]), ScoreRow("gamma", "other", ["maybe"])]
    # the sharpened test model's log-likelihoods are in the thousands: half precision keeps ~3 significant digits
    tolerance = dict(abs=1e-3, rel=1e-5) if dtype == "float32" else dict(abs=0.5, rel=1e-2)
    for ours, ref in zip(gpu.score(rows), cpu.score(rows), strict=True):
        for a, b in zip(ours, ref, strict=True):
            assert a.logprob_sum == pytest.approx(b.logprob_sum, **tolerance)
    adapter = gpu.adapter("beta")
    assert adapter.groups[0].lora_a.device.type == "cuda" and adapter.groups[0].lora_a.dtype == getattr(torch, dtype)


def test_cuda_mixed_batch_generation_and_beams(t5_bundle):
    gpu = engine_on(t5_bundle, "cuda", "bfloat16")
    rows = [GenerateRow(t, "input text", SamplingParams(max_new_tokens=6)) for t in ("alpha", "beta", "gamma")]
    assert len(gpu.generate(rows)) == 3
    beams = [GenerateRow("alpha", "x", SamplingParams(max_new_tokens=6, num_beams=3))]
    assert gpu.generate(beams)[0].completion_tokens <= 6


def test_cuda_cache_memory_stays_bounded(t5_bundle):
    adapter_bytes = engine_on(t5_bundle, "cpu", "float32").store.adapter("alpha").nbytes // 2  # bf16
    gpu = engine_on(t5_bundle, "cuda", "bfloat16", cache_bytes=2 * adapter_bytes)
    gpu.adapter("alpha")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(20):
        for task in ("alpha", "beta", "gamma", "__mu__"):
            gpu.adapter(task)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= 2 * adapter_bytes
    assert gpu.cache.stats().bytes <= 2 * adapter_bytes and gpu.cache.stats().evictions > 0


def test_cuda_rows_joining_the_running_batch_equal_each_row_alone(t5_bundle):
    """The serving loop on the GPU (float32, so batch shapes cannot change a greedy choice): rows that join a
    batch mid-generation and rows that leave early each equal the row run alone."""
    gpu = engine_on(t5_bundle, "cuda", "float32")
    rows = [GenerateRow(t, text, SamplingParams(max_new_tokens=n, ignore_eos=True))
            for t, text, n in (("alpha", "first row", 24), ("beta", "joins later", 6), ("gamma", "x", 12))]
    first = gpu.submit_generate(rows[:1])
    while gpu.stats().running_rows == 0 and not first.future.done():  # the others join while it decodes
        time.sleep(0.0005)
    later = [gpu.submit_generate([row]) for row in rows[1:]]
    together = [first.future.result(60)[0], *[job.future.result(60)[0] for job in later]]
    alone = [gpu.generate([GenerateRow(r.task, r.text, r.params)])[0] for r in rows]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.completion_tokens for c in together] == [24, 6, 12]
    sampled = SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    greedy = SamplingParams(max_new_tokens=8)
    mixed = gpu.generate([GenerateRow("alpha", "s", sampled), GenerateRow("beta", "g", greedy)])
    assert mixed[0].text == gpu.generate([GenerateRow("alpha", "s", sampled)])[0].text
    gpu.close()


def test_cuda_memory_plan_reads_the_card(t5_bundle):
    gpu = engine_on(t5_bundle, "cuda", "bfloat16")
    plan = gpu.memory
    assert plan.figures.source.startswith("cuda") and plan.figures.limit_bytes == torch.cuda.mem_get_info()[1]
    assert not plan.prepack and "not possible" in next(i.why for i in plan.items if i.name == "prepacked weights")
    gpu.close()


def test_cuda_adapters_route_on_the_card_and_equal_the_hosts(t5_bundle):
    """The plan keeps the skills on the card; adapters routed there equal the host's (float32)."""
    gpu = engine_on(t5_bundle, "cuda", "float32")
    assert gpu.memory.skills_on_device
    names = ["alpha", "beta", "gamma", "__mu__"]
    on_card, on_host = gpu.store.adapters(names, device=gpu.loaded.device), gpu.store.adapters(names)
    for card, host in zip(on_card, on_host, strict=True):
        for (_, a, b), (_, host_a, host_b) in zip(card.layers(), host.layers(), strict=True):
            assert a.device.type == "cuda"
            assert torch.allclose(a.cpu(), host_a, atol=1e-5) and torch.allclose(b.cpu(), host_b, atol=1e-5)
    gpu.close()


def test_cuda_serving_loop_turns_off_per_length_cudnn_attention(t5_bundle):
    """cuDNN attention plans per key length; the loop's caches grow every step (82 vs 10 ms per step, H200)."""
    engine_on(t5_bundle, "cuda", "float32")
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_cuda_small_kv_pool_preempts_and_answers_as_a_roomy_one(t5_bundle):
    """The KV pool on the card: a pool of a few blocks preempts rows (computed again later) and every answer
    equals a roomy pool's."""
    def on_gpu(**options):
        loaded = load_model(t5_bundle / "model", device="cuda", dtype="float32")
        return Engine(loaded, AdapterStore.open(t5_bundle / "inventory"),
                      AdapterCache(10**8, loaded.device, loaded.dtype), **options)

    rows = [GenerateRow(("alpha", "beta", "gamma")[i % 3], f"input {i}", SamplingParams(max_new_tokens=40,
                                                                                        ignore_eos=True))
            for i in range(8)]
    small, roomy = on_gpu(max_batch_tokens=128), on_gpu()
    assert [c.text for c in small.generate(rows)] == [c.text for c in roomy.generate(rows)]
    assert small.loop.batch.preemptions > 0 and small.loop.batch.kv.blocks.used == 0
    assert small.loop.batch.kv.pool.keys[0].device.type == "cuda"


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_cuda_graphs_step_equals_the_paged_step(kind, tmp_path):
    """The static-shaped step captured as CUDA graphs (MHR_CUDA_GRAPHS): greedy rows of mixed tasks, the bare
    backbone and μ, joining and leaving, and a beam search beside rows, equal the paged step's; graphs were captured
    and none turned off."""
    save_bundle(tmp_path, kind)

    def on_gpu(**options):
        loaded = load_model(tmp_path / "model", device="cuda", dtype="float32")
        return Engine(loaded, AdapterStore.open(tmp_path / "inventory"),
                      AdapterCache(10**8, loaded.device, loaded.dtype), kv_block_size=4, **options)

    tasks = ["task-0", "task-1", "task-2", "__base__", "task-0", "__mu__"]
    rows = [GenerateRow(task, f"input number {i} " * (1 + i % 3), SamplingParams(max_new_tokens=5 + 4 * i,
                                                                                ignore_eos=True))
            for i, task in enumerate(tasks)]
    single = [GenerateRow("task-1", text, SamplingParams(max_new_tokens=12)) for text in ("a", "bc", "def")]
    beams = [GenerateRow("task-2", "beams beside rows", SamplingParams(max_new_tokens=8, num_beams=3)), *rows[:2]]
    graphs, paged = on_gpu(static_step="cuda-graphs"), on_gpu()
    for batch in (rows, single, beams):
        assert [c.text for c in graphs.generate(batch)] == [c.text for c in paged.generate(batch)]
    static = graphs.loop.batch.kv.static
    assert static.mode == "cuda-graphs" and static.captures > 0 and static.steps > 0
    graphs.close()
    paged.close()



def test_cuda_graphs_stay_on_when_padding_rows_hold_other_tasks_adapters():
    """The demo's 24 tasks in one batch, rows leaving at different steps: the padding rows of each bucket hold the
    departed rows' adapters, write different keys to the one scratch slot, and what they read back is up to the
    card. Graphs stay on (the capture check compares real rows only), and the texts equal the paged step's. Over
    HTTP on an H200 the demo turned its graphs off this way."""
    demo = Path(__file__).resolve().parents[2] / "demo" / "bundle"
    tasks = json.loads((demo / "inventory" / "tasks.json").read_text())

    def on_gpu(**options):
        loaded = load_model(demo / "model", device="cuda", dtype="float32")
        return Engine(loaded, AdapterStore.open(demo / "inventory"), AdapterCache(10**8, loaded.device, loaded.dtype),
                      **options)

    rows = [GenerateRow(task, f"word{i} " * (1 + i % 4), SamplingParams(max_new_tokens=3 + i, ignore_eos=True))
            for i, task in enumerate(tasks)]
    graphs, paged = on_gpu(static_step="cuda-graphs"), on_gpu()
    assert [c.text for c in graphs.generate(rows)] == [c.text for c in paged.generate(rows)]
    static = graphs.loop.batch.kv.static
    assert static.mode == "cuda-graphs" and static.captures > 1
    graphs.close()
    paged.close()

BODIES = [
    {"task": "alpha", "inputs": ["some input", "another one"], "max_new_tokens": 8},
    {"task": "__base__", "inputs": "bare", "max_new_tokens": 8},
    {"task": {"route": "arrow", "over": "skills", "top_k": 2}, "inputs": "routed per token", "max_new_tokens": 6},
    {"task": {"route": "arrow", "over": "tasks", "top_k": 2, "granularity": "prompt"}, "inputs": "once",
     "max_new_tokens": 6},
    {"task": "beta", "inputs": "guided", "guided": {"choice": ["yes", "no", "maybe"]}, "max_new_tokens": 8},
    {"task": "gamma", "inputs": "with logprobs", "max_new_tokens": 4, "logprobs": 2},
    {"task": "alpha", "inputs": "beams", "num_beams": 3, "max_new_tokens": 6},
]


def test_cuda_server_answers_as_the_cpu_server(t5_bundle):
    """The app on CUDA as configured by default (CUDA graphs on, float32 here so that greedy choices compare) gives
    the CPU server's texts for plain, bare, Arrow (per token and per prompt), guided, logprobs and beam requests,
    and /readyz shows the graphs ran."""
    answers = {}
    for device in ("cpu", "cuda"):
        with TestClient(create_app(bundle_settings(t5_bundle, device=device, dtype="float32"))) as client:
            answers[device] = [client.post("/generate", json=body).json() for body in BODIES]
            ready = client.get("/readyz").json()
    for cpu, cuda in zip(answers["cpu"], answers["cuda"], strict=True):
        assert [o["text"] for o in cuda["outputs"]] == [o["text"] for o in cpu["outputs"]], (cpu, cuda)
    cpu_logprobs, cuda_logprobs = (a[5]["outputs"][0]["logprobs"] for a in (answers["cpu"], answers["cuda"]))
    assert [t["logprob"] for t in cuda_logprobs] == pytest.approx([t["logprob"] for t in cpu_logprobs], abs=1e-2)
    assert ready["static_step"]["mode"] == "cuda-graphs" and ready["static_step"]["graph_captures"] > 0
