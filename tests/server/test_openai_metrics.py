"""OpenAI-compatible routes (with the real OpenAI SDK), Prometheus metrics, and the body-size cap."""

import openai
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.server.conftest import bundle_settings


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


def test_metrics_report_requests_batches_tokens_cache_and_jobs(client):
    client.post("/generate", json={"task": "gamma", "inputs": "count me", "max_new_tokens": 3})
    client.get("/tasks/nope")
    text = client.get("/metrics").text
    assert 'mhr_requests_total{method="POST",route="/generate",status="200"}' in text
    assert 'mhr_requests_total{method="GET",route="/tasks/{name}",status="404"}' in text
    assert 'mhr_task_requests_total{task="gamma"}' in text
    assert "mhr_generated_tokens_total" in text and "mhr_batch_rows_bucket" in text
    assert "mhr_adapter_cache_misses_total" in text and "mhr_queue_depth" in text
    assert 'mhr_adapt_jobs{state="running"}' in text


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
