"""OpenAI-compatible routes (with the real OpenAI SDK), Prometheus metrics, and the body-size cap."""

import asyncio
import time

import openai
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engine.loop_clock import PHASES
from tests.server.conftest import bundle_settings, metric, metric_values, serving, wait_job


@pytest.fixture
def sdk(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def test_openai_sdk_completion_equals_generate(client, sdk):
    completion = sdk.completions.create(model="alpha", prompt="hello", max_tokens=6, temperature=0)
    ours = client.post("/generate", json={"task": "alpha", "inputs": "hello", "max_new_tokens": 6}).json()
    assert completion.choices[0].text == ours["outputs"][0]["text"]
    assert completion.model == "alpha" and completion.usage.completion_tokens == ours["usage"]["completion_tokens"]


def test_openai_sdk_lists_tasks_as_models(sdk):
    assert {"alpha", "beta", "gamma", "__mu__"} <= {m.id for m in sdk.models.list()}


def test_openai_sdk_streams(client, sdk):
    stream = sdk.completions.create(model="beta", prompt=["one", "two"], max_tokens=6, temperature=0, stream=True)
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    plain = client.post("/generate", json={"task": "beta", "inputs": ["one", "two"], "max_new_tokens": 6}).json()
    assert texts == [o["text"] for o in plain["outputs"]]


def test_openai_errors_are_4xx_with_a_message(sdk):
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.completions.create(model="alpha", prompt="x", max_tokens=10_000)


def scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    return metric_values(response.text)


def deltas(before: dict, after: dict):
    return lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)


def test_request_token_task_latency_and_batch_metrics_move_by_what_was_sent(printable_bundle, tmp_path):
    """The printable bundle never ends a sequence early, so each row generates exactly max_new_tokens."""
    started = time.perf_counter()
    with TestClient(create_app(bundle_settings(printable_bundle, adapted_dir=tmp_path))) as client:
        before = scrape(client)
        usage = []
        for i in range(3):
            body = {"task": "gamma", "inputs": f"count {i}", "max_new_tokens": 2 + i}
            usage.append(client.post("/generate", json=body).json()["usage"]["completion_tokens"])
        usage.append(client.post("/generate", json={"task": "beta", "inputs": ["a", "b"], "max_new_tokens": 4})
                     .json()["usage"]["completion_tokens"])
        completion = client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 3,
                                                           "temperature": 0})
        usage.append(completion.json()["usage"]["completion_tokens"])
        assert client.post("/score", json={"task": "alpha", "inputs": ["one", "two"], "choices": ["x", "y"]}
                           ).status_code == 200
        assert client.get("/tasks/nope").status_code == 404 and client.get("/tasks/nope").status_code == 404
        assert client.post("/generate", json={"task": "alpha", "inputs": ""}).status_code == 422
        after = scrape(client)
    d = deltas(before, after)
    assert usage == [2, 3, 4, 8, 3]
    requests = "mhr_requests_total"
    assert d(requests, method="POST", route="/generate", status="200") == 4
    assert d(requests, method="POST", route="/generate", status="422") == 1
    assert d(requests, method="POST", route="/v1/completions", status="200") == 1
    assert d(requests, method="POST", route="/score", status="200") == 1
    assert d(requests, method="GET", route="/tasks/{name}", status="404") == 2
    assert d(requests, method="GET", route="/metrics", status="200") == 1  # the first scrape
    assert d("mhr_generated_tokens_total") == sum(usage) == 20
    assert (d("mhr_task_requests_total", task="gamma"), d("mhr_task_requests_total", task="beta"),
            d("mhr_task_requests_total", task="alpha")) == (3, 1, 2)
    assert d("mhr_request_seconds_count", route="/generate") == 5
    assert d("mhr_request_seconds_bucket", route="/generate", le="+Inf") == 5
    assert d("mhr_request_seconds_sum", route="/generate") > 0
    # rows per batch (decoding step): sent one at a time, no batch held more than the 2-row request, one held
    # both of its rows, and each generated row was in a batch (at most once per token it generated)
    steps = d("mhr_batch_rows_count")
    assert steps >= 1 and d("mhr_batch_rows_bucket", le="2.0") == steps > d("mhr_batch_rows_bucket", le="1.0")
    assert 3 + 2 + 1 <= d("mhr_batch_rows_sum") <= sum(usage)
    # sent one request at a time: each joined in a prefill of its own, the 2-row request's rows together
    assert (d("mhr_joining_prefills_total"), d("mhr_joined_rows_total")) == (5, 6)
    assert metric(after, "mhr_queue_depth") == 0
    # the loop's time by phase: those requests took some of each (the /score chunk is "other"), and all phases
    # together no more than the app has lived
    assert all(d("mhr_loop_seconds_total", phase=phase) > 0 for phase in PHASES)
    assert sum(metric(after, "mhr_loop_seconds_total", phase=phase) for phase in PHASES) < time.perf_counter() - started


def test_adapter_cache_metrics_follow_what_was_served(printable_bundle, tmp_path):
    with TestClient(create_app(bundle_settings(printable_bundle, adapted_dir=tmp_path))) as client:
        def generate(task):
            assert client.post("/generate", json={"task": task, "inputs": "x", "max_new_tokens": 2}).status_code == 200

        start = scrape(client)
        generate("gamma")
        first = scrape(client)
        d = deltas(start, first)
        one_adapter = d("mhr_adapter_cache_bytes")
        assert one_adapter > 0
        assert (d("mhr_adapter_cache_misses_total"), d("mhr_adapter_cache_entries")) == (1, 1)
        generate("gamma")
        repeat = scrape(client)
        d = deltas(first, repeat)
        assert (d("mhr_adapter_cache_misses_total"), d("mhr_adapter_cache_entries"), d("mhr_adapter_cache_bytes")
                ) == (0, 0, 0)
        assert d("mhr_adapter_cache_hits_total") >= 1
        generate("alpha")
        generate("beta")
        d = deltas(repeat, scrape(client))
        assert (d("mhr_adapter_cache_misses_total"), d("mhr_adapter_cache_entries"), d("mhr_adapter_cache_bytes")
                ) == (2, 2, 2 * one_adapter)
        assert metric(scrape(client), "mhr_adapter_cache_evictions_total") == 0
    capacity = int(1.5 * one_adapter)  # room for one adapter
    small = bundle_settings(printable_bundle, adapted_dir=tmp_path, cache_bytes=capacity)
    with TestClient(create_app(small)) as client:
        start = scrape(client)
        for task in ("alpha", "beta", "gamma", "alpha"):
            generate(task)
        end = scrape(client)
        d = deltas(start, end)
        assert d("mhr_adapter_cache_misses_total") == 4 and d("mhr_adapter_cache_evictions_total") >= 3
        assert metric(end, "mhr_adapter_cache_entries") == 1
        assert one_adapter == metric(end, "mhr_adapter_cache_bytes") <= capacity
        # every miss put one entry in, every eviction took one out
        assert d("mhr_adapter_cache_entries") == d("mhr_adapter_cache_misses_total") - d(
            "mhr_adapter_cache_evictions_total")


def test_adapt_job_gauges_match_the_jobs(printable_bundle, tmp_path):
    examples = [{"input": f"in {i}", "target": "out"} for i in range(4)]
    with TestClient(create_app(bundle_settings(printable_bundle, adapted_dir=tmp_path))) as client:
        def jobs():
            values = scrape(client)
            return {state: metric(values, "mhr_adapt_jobs", state=state)
                    for state in ("queued", "running", "succeeded", "failed", "cancelled")}

        assert set(jobs().values()) == {0}
        done = client.post("/adapt", json={"task": "done", "examples": examples, "steps": 2}).json()
        assert wait_job(client, done["id"])["state"] == "succeeded"
        long = client.post("/adapt", json={"task": "long", "examples": examples, "steps": 2000}).json()
        wait_job(client, long["id"], states=("running",))
        queued = client.post("/adapt", json={"task": "queued", "examples": examples, "steps": 2}).json()
        assert queued["state"] == "queued"
        assert jobs() == {"queued": 1, "running": 1, "succeeded": 1, "failed": 0, "cancelled": 0}
        client.delete(f"/adapt/{queued['id']}")
        client.delete(f"/adapt/{long['id']}")
        assert wait_job(client, long["id"])["state"] == "cancelled"
        assert jobs() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 2}


def test_queue_depth_counts_requests_in_flight_and_returns_to_zero(printable_bundle):
    app = create_app(bundle_settings(printable_bundle, max_batch_size=4, max_batch_wait_ms=0))
    body = {"task": "alpha", "inputs": [f"row {i}" for i in range(8)], "max_new_tokens": 16}

    async def scenario():
        async with serving(app) as http:
            async def depth():
                return metric(metric_values((await http.get("/metrics")).text), "mhr_queue_depth")

            assert await depth() == 0
            requests = [asyncio.create_task(http.post("/generate", json=body)) for _ in range(3)]
            seen = []
            while not all(r.done() for r in requests):
                seen.append(await depth())
                await asyncio.sleep(0.005)
            assert all(r.result().status_code == 200 for r in requests)
            return seen, await depth()

    seen, idle = asyncio.run(scenario())
    assert max(seen) >= 1, seen
    assert idle == 0


def test_task_labels_are_bounded(t5_bundle):
    app = create_app(bundle_settings(t5_bundle))
    app.state.metrics._max_task_labels = 2
    for name in ("a", "b", "c", "d"):
        app.state.metrics.count_task(name)
    samples = {s.labels["task"]: s.value for m in app.state.metrics.registry.collect() for s in m.samples
               if s.name == "mhr_task_requests_total"}
    assert samples == {"a": 1, "b": 1, "other": 2}


def test_body_over_the_cap_is_413(t5_bundle):
    with TestClient(create_app(bundle_settings(t5_bundle, max_body_bytes=2048))) as small:
        response = small.post("/generate", json={"task": "alpha", "inputs": "x" * 5000})
        assert response.status_code == 413 and response.json()["error"]["field"] == "body"

        def chunks():
            yield b'{"task": "alpha", "inputs": "'
            yield b"x" * 5000
            yield b'"}'

        streamed = small.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413


def test_kv_pool_blocks_show_in_readyz_and_metrics(printable_bundle, tmp_path):
    settings = bundle_settings(printable_bundle, adapted_dir=tmp_path, max_batch_tokens=256, kv_block_size=8)
    with TestClient(create_app(settings)) as client:
        kv = client.get("/readyz").json()["kv"]
        assert kv["block_size"] == 8 and kv["blocks_total"] == 256 // 8 + 1  # + one block of rounding
        assert kv["blocks_free"] + kv["blocks_cached"] == kv["blocks_total"]  # nothing running
        assert client.post("/generate", json={"task": "alpha", "inputs": "x" * 30, "max_new_tokens": 4}
                           ).status_code == 200
        values = scrape(client)
        assert metric(values, "mhr_kv_blocks_total") == kv["blocks_total"]
        cached = metric(values, "mhr_kv_blocks_cached")  # T5: the input's encoder output, kept for reuse
        assert cached >= 30 // 8 and metric(values, "mhr_kv_blocks_free") == kv["blocks_total"] - cached
        assert metric(values, "mhr_preempted_rows_total") == 0
        assert client.post("/generate", json={"task": "alpha", "inputs": "x" * 30, "max_new_tokens": 4}
                           ).status_code == 200
        assert metric(scrape(client), "mhr_encoder_cache_hits_total") == 1
        assert client.get("/readyz").json()["kv"]["encoder_cache_hits"] == 1


@pytest.mark.parametrize(("mode", "value"), [("cuda-graphs", 1), ("eager", 0), (None, None)])
def test_cuda_graphs_gauge_says_whether_graphs_still_run(mode, value):
    """Graphs turned off mid-serving (a capture that differs) show as 0, for an alert; no static step: no gauge."""
    from prometheus_client import CollectorRegistry, generate_latest

    from adapter_store.cache import CacheStats
    from server.engine.scheduler import LoopStats
    from server.metrics import _StateCollector

    registry = CollectorRegistry()
    registry.register(_StateCollector(lambda: LoopStats(0, 0, 0, static_step=mode),
                                      lambda: CacheStats(0, 0, 0, 0, 0, 0), list))
    values = metric_values(generate_latest(registry).decode())
    assert values.get(("mhr_cuda_graphs_active", frozenset())) == value
