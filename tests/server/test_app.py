"""The HTTP API over a tiny T5 bundle: routes, validation errors naming their field, streaming, batching."""

import asyncio
import io
import threading
import zipfile

import httpx
import pytest

from adapter_store import AdapterStore
from server.app import create_app
from tests.server.conftest import bundle_settings, serving, sse_events


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["device"] == "cpu"
    assert ready["static_step"] == {"mode": None, "steps": 0, "graph_captures": 0}  # CPU: the paged step


def test_task_listing(client):
    tasks = {t["name"]: t for t in client.get("/tasks").json()["tasks"]}
    assert set(tasks) == {"__mu__", "__base__", "alpha", "beta", "gamma"}
    assert tasks["__base__"]["kind"] == "base"
    assert tasks["beta"] == {"name": "beta", "kind": "pretrained", "version": 1, "method": "routed", "row": 1,
                             "created": None, "mix": None, "route": None, "reason": None}
    assert client.get("/tasks/gamma").json()["row"] == 2


def test_unknown_task_is_404_and_says_how_to_list(client):
    for response in (client.get("/tasks/nope"), client.post("/generate", json={"task": "nope", "inputs": "x"})):
        assert response.status_code == 404
        assert "GET /tasks" in response.json()["error"]["message"]


def test_generate_single_and_list(client):
    one = client.post("/generate", json={"task": "alpha", "inputs": "hello", "max_new_tokens": 5}).json()
    assert one["task"] == "alpha" and one["version"] == 1 and len(one["outputs"]) == 1
    assert one["outputs"][0]["completion_tokens"] <= 5 and one["outputs"][0]["prompt_tokens"] == 6  # 5 bytes + </s>
    many = client.post("/generate", json={"task": "alpha", "inputs": ["hello", "abc"], "max_new_tokens": 5}).json()
    assert many["outputs"][0]["text"] == one["outputs"][0]["text"]
    assert many["usage"]["completion_tokens"] == sum(o["completion_tokens"] for o in many["outputs"])


def test_tasks_give_different_outputs_and_mu_is_served(client):
    texts = {client.post("/generate", json={"task": t, "inputs": "same input", "max_new_tokens": 8}).json()
             ["outputs"][0]["text"] for t in ("alpha", "beta", "gamma", "__mu__")}
    assert len(texts) > 1


def test_beams_work(client):  # sampling: tests/server/test_sampling.py, on a model whose samples vary
    beams = client.post("/generate", json={"task": "beta", "inputs": "x", "num_beams": 3, "max_new_tokens": 6})
    assert beams.status_code == 200


BAD_REQUESTS = [
    ({"task": "alpha", "inputs": ""}, 422, "inputs"),
    ({"task": "alpha", "inputs": []}, 422, "inputs"),
    ({"task": "alpha", "inputs": "x" * 100}, 422, "inputs"),  # > max_input_tokens (64)
    ({"task": "alpha", "inputs": ["ok", "y" * 100]}, 422, "inputs.1"),
    ({"task": "alpha", "inputs": "x", "max_new_tokens": -1}, 422, "max_new_tokens"),
    ({"task": "alpha", "inputs": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"task": "alpha", "inputs": "x", "max_new_tokens": 17}, 422, "max_new_tokens"),  # > server limit (16)
    ({"task": "alpha", "inputs": "x", "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ({"task": "alpha", "inputs": 5}, 422, "inputs"),
    ({"task": 5, "inputs": "x"}, 422, "task"),
    ({"inputs": "x"}, 422, "task"),
    ({"task": "alpha", "inputs": "x", "temperature": 0}, 422, "temperature"),
    ({"task": "alpha", "inputs": "x", "top_p": 1.5}, 422, "top_p"),
    ({"task": "alpha", "inputs": "x", "num_beams": 99}, 422, "num_beams"),
    ({"task": "alpha", "inputs": "x", "num_beams": 2, "stream": True}, 422, "stream"),
    ({"task": "alpha", "inputs": "x", "stop": [""]}, 422, "stop"),
    ({"task": "alpha", "inputs": "x", "unknown_field": 1}, 422, "unknown_field"),
    ({"task": "nope", "inputs": "x"}, 404, "task"),
]


@pytest.mark.parametrize("body,status,field", BAD_REQUESTS)
def test_bad_generate_requests_name_the_field(client, body, status, field):
    response = client.post("/generate", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"].startswith(field) and error["message"]


def test_malformed_json_is_422_not_500(client):
    response = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["message"]


def test_score_ranks_choices(client):
    body = {"task": "alpha", "inputs": ["one", "two"], "choices": ["yes", "no", "maybe"]}
    results = client.post("/score", json=body).json()["results"]
    assert len(results) == 2 and [s["choice"] for s in results[0]["scores"]] == ["yes", "no", "maybe"]
    for result in results:
        sums = [s["logprob_sum"] for s in result["scores"]]
        assert result["best_index"] == sums.index(max(sums)) and result["best"] == body["choices"][result["best_index"]]
        assert all(s["tokens"] == len(s["choice"]) + 1 for s in result["scores"])  # bytes + </s>
    per_input = {"task": "alpha", "inputs": ["one", "two"], "choices": [["a", "b"], ["c"]]}
    assert [len(r["scores"]) for r in client.post("/score", json=per_input).json()["results"]] == [2, 1]
    mismatch = client.post("/score", json={"task": "alpha", "inputs": ["one", "two"], "choices": [["a"]]})
    assert mismatch.status_code == 422 and mismatch.json()["error"]["field"] == "choices"


def test_stream_pieces_add_up_to_the_final_text(client):
    body = {"task": "gamma", "inputs": ["stream this", "and this"], "max_new_tokens": 10, "stream": True}
    pieces, done = ["", ""], None
    with client.stream("POST", "/generate", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for event, data in sse_events(response.iter_lines()):
            if event == "done":
                done = data
            else:
                pieces[data["index"]] += data["text"]
    plain = client.post("/generate", json={**body, "stream": False}).json()
    assert done is not None and [o["text"] for o in done["outputs"]] == pieces
    assert pieces == [o["text"] for o in plain["outputs"]]


def test_concurrent_requests_of_different_tasks_batch_and_match_single_runs(t5_bundle):
    app = create_app(bundle_settings(t5_bundle, max_batch_size=8, max_batch_wait_ms=200))

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                bodies = [{"task": ["alpha", "beta", "gamma"][i % 3], "inputs": f"input {i}", "max_new_tokens": 8}
                          for i in range(6)]
                together = await asyncio.gather(*(http.post("/generate", json=b) for b in bodies))
                alone = [await http.post("/generate", json=b) for b in bodies]
                return [r.json()["outputs"][0]["text"] for r in together], [r.json()["outputs"][0]["text"]
                                                                             for r in alone]

    together, alone = asyncio.run(scenario())
    assert together == alone
    steps = {s.labels["le"]: s.value for m in app.state.metrics.registry.collect() for s in m.samples
             if s.name == "mhr_batch_rows_bucket"}
    assert steps["+Inf"] > steps["1.0"], f"no decoding step ran more than one row: {steps}"


def test_openapi_spec_and_docs_are_served(client):
    spec = client.get("/openapi.json")
    assert spec.status_code == 200 and "/generate" in spec.json()["paths"]
    assert "/openapi.json" not in spec.json()["paths"]  # the docs routes stay out of the spec
    assert "swagger" in client.get("/docs").text.lower() and client.get("/redoc").status_code == 200


def test_health_answers_while_an_export_is_in_progress(t5_bundle, monkeypatch):
    """Export routes, writes and zips off the event loop: other requests are answered meanwhile."""
    started, release = threading.Event(), threading.Event()
    real_export = AdapterStore.export_lora

    def large_export(self, name, out_dir, **kwargs):  # stands for a T5-XL-sized export: held until released
        started.set()
        release.wait(30)
        return real_export(self, name, out_dir, **kwargs)

    monkeypatch.setattr(AdapterStore, "export_lora", large_export)
    app = create_app(bundle_settings(t5_bundle))

    async def scenario():
        async with serving(app) as http:
            export = asyncio.ensure_future(http.get("/tasks/alpha/lora"))
            while not started.is_set():
                await asyncio.sleep(0.005)
            health = await http.get("/healthz")
            tasks = await http.get("/tasks")
            assert health.status_code == 200 and tasks.status_code == 200 and not export.done()
            release.set()
            return await export

    response = asyncio.run(scenario())
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert "alpha/adapter_model.safetensors" in archive.namelist()
