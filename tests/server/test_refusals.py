"""Every way the server refuses a request it cannot or must not take: 503 with Retry-After (full queue, full
adaptation queue, shutting down) and the API key (mutating routes, export, job cancel, all routes)."""

import asyncio
import zipfile
from io import BytesIO

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.server.conftest import bundle_settings, serving, wait_job

EXAMPLES = [{"input": f"in {i}", "target": "out"} for i in range(4)]
KEY = "s3cret"


def assert_error(response, status: int, type_: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message", "field"} and error["message"], error
    if type_:
        assert error["type"] == type_, error
    return error


def assert_retry_after(response, type_: str) -> None:
    assert_error(response, 503, type_)
    assert int(response.headers["retry-after"]) >= 1, response.headers


def test_full_queue_is_503_with_retry_after_and_the_server_recovers(printable_bundle, tmp_path):
    settings = bundle_settings(printable_bundle, adapted_dir=tmp_path, max_queue=1, max_batch_size=1,
                               max_batch_wait_ms=0)
    app = create_app(settings)
    long = {"task": "alpha", "inputs": "a request that takes a while", "max_new_tokens": 16}
    others = [("/generate", {"task": "beta", "inputs": "x", "max_new_tokens": 16}),
              ("/generate", {"task": "beta", "inputs": "x", "max_new_tokens": 4, "stream": True}),
              ("/score", {"task": "gamma", "inputs": "x", "choices": ["a", "b"]}),
              ("/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 4, "temperature": 0})]

    async def scenario():
        async with serving(app) as http:
            burst = [("/generate", long)] * 4 + others * 2
            responses = await asyncio.gather(*(http.post(path, json=body) for path, body in burst))
            after = await http.post("/generate", json=long)
            return burst, responses, after

    burst, responses, after = asyncio.run(scenario())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    refused = [(path, r) for (path, _), r in zip(burst, responses, strict=True) if r.status_code == 503]
    assert len(refused) >= len(burst) - 3, statuses  # at most one running and one waiting at any time
    for path, response in refused:
        assert_retry_after(response, "overloaded")
        assert "queue" in response.json()["error"]["message"], (path, response.text)
    assert {path for path, _ in refused} >= {"/generate", "/score"}
    assert after.status_code == 200  # nothing stays counted once the burst is over


def test_full_adaptation_queue_is_503_with_retry_after(printable_bundle, tmp_path):
    settings = bundle_settings(printable_bundle, adapted_dir=tmp_path, adapt_max_queued=1)
    with TestClient(create_app(settings)) as client:
        running = client.post("/adapt", json={"task": "running", "examples": EXAMPLES, "steps": 2000}).json()
        wait_job(client, running["id"], states=("running",))
        queued = client.post("/adapt", json={"task": "queued", "examples": EXAMPLES, "steps": 2})
        assert queued.status_code == 202 and queued.json()["state"] == "queued"
        refused = client.post("/adapt", json={"task": "refused", "examples": EXAMPLES, "steps": 2})
        assert_retry_after(refused, "overloaded")
        assert client.get("/tasks/refused").status_code == 404
        assert all(job["task"] != "refused" for job in client.get("/adapt").json()["jobs"])
        client.delete(f"/adapt/{queued.json()['id']}")
        later = client.post("/adapt", json={"task": "later", "examples": EXAMPLES, "steps": 2})
        assert later.status_code == 202  # a place in the queue is free again
        client.delete(f"/adapt/{running['id']}")
        assert wait_job(client, running["id"])["state"] == "cancelled"
        assert wait_job(client, later.json()["id"])["state"] == "succeeded"
    assert not (tmp_path / "refused.safetensors").exists()


@pytest.fixture(scope="module")
def shut_down_app(printable_bundle, tmp_path_factory):
    """An app whose lifespan ran and ended (the server shut down), and a client that sends it requests."""
    app = create_app(bundle_settings(printable_bundle, adapted_dir=tmp_path_factory.mktemp("adapted")))
    with TestClient(app) as client:
        assert client.post("/generate", json={"task": "alpha", "inputs": "x", "max_new_tokens": 2}).status_code == 200
    return TestClient(app)  # used without `with`: no new lifespan


@pytest.mark.parametrize("path,body", [
    ("/generate", {"task": "alpha", "inputs": "late", "max_new_tokens": 2}),
    ("/generate", {"task": "alpha", "inputs": "late", "max_new_tokens": 2, "stream": True}),
    ("/score", {"task": "alpha", "inputs": "late", "choices": ["a", "b"]}),
    ("/v1/completions", {"model": "alpha", "prompt": "late", "max_tokens": 2}),
    ("/v1/completions", {"model": "alpha", "prompt": "late", "max_tokens": 2, "stream": True}),
])
def test_requests_after_shutdown_are_503_with_retry_after(shut_down_app, path, body):
    assert_retry_after(shut_down_app.post(path, json=body), "unavailable")


def test_adapt_after_shutdown_is_503_with_retry_after(shut_down_app):
    response = shut_down_app.post("/adapt", json={"task": "too-late", "examples": EXAMPLES, "steps": 2})
    assert_retry_after(response, "unavailable")


@pytest.fixture(scope="module")
def keyed(printable_bundle, tmp_path_factory):
    settings = bundle_settings(printable_bundle, adapted_dir=tmp_path_factory.mktemp("adapted"), api_key=KEY)
    with TestClient(create_app(settings)) as client:
        yield client


def assert_needs_key(client, method: str, path: str, ok_status: int, **kwargs):
    """401 (with WWW-Authenticate) without a key, 403 with a wrong one, `ok_status` with the key either way."""
    missing = client.request(method, path, **kwargs)
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_error(client.request(method, path, headers={"Authorization": "Bearer wrong"}, **kwargs), 403, "forbidden")
    assert_error(client.request(method, path, headers={"X-API-Key": "wrong"}, **kwargs), 403, "forbidden")
    ok = client.request(method, path, headers={"Authorization": f"Bearer {KEY}"}, **kwargs)
    assert ok.status_code == ok_status, ok.text
    return ok


def test_export_needs_the_key(keyed):
    ok = assert_needs_key(keyed, "GET", "/tasks/alpha/lora", 200)
    assert ok.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(BytesIO(ok.content)) as archive:
        assert "alpha/adapter_config.json" in archive.namelist()
    assert keyed.get("/tasks/alpha/lora", headers={"X-API-Key": KEY}).status_code == 200
    assert keyed.get("/tasks/nope/lora", headers={"X-API-Key": KEY}).status_code == 404


def test_cancelling_a_job_needs_the_key(keyed):
    headers = {"X-API-Key": KEY}
    job = keyed.post("/adapt", json={"task": "to-cancel", "examples": EXAMPLES, "steps": 2000}, headers=headers)
    assert job.status_code == 202
    job_id = job.json()["id"]
    assert_error(keyed.delete(f"/adapt/{job_id}"), 401, "unauthorized")
    assert_error(keyed.delete(f"/adapt/{job_id}", headers={"X-API-Key": "wrong"}), 403, "forbidden")
    state = keyed.get(f"/adapt/{job_id}").json()  # reading jobs needs no key unless on every route
    assert state["state"] in ("queued", "running") and not state["cancel_requested"]
    assert keyed.delete(f"/adapt/{job_id}", headers=headers).status_code == 200
    assert wait_job(keyed, job_id)["state"] == "cancelled"


def test_reading_routes_are_open_unless_the_key_is_on_every_route(keyed):
    assert keyed.get("/tasks").status_code == 200
    assert keyed.post("/generate", json={"task": "alpha", "inputs": "x", "max_new_tokens": 2}).status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_key_on_every_route_but_the_health_checks(printable_bundle, tmp_path):
    settings = bundle_settings(printable_bundle, adapted_dir=tmp_path, api_key=KEY, api_key_all_routes=True)
    with TestClient(create_app(settings)) as client:
        job = client.post("/adapt", json={"task": "done", "examples": EXAMPLES, "steps": 1},
                          headers={"X-API-Key": KEY})
        assert job.status_code == 202
        job_id = job.json()["id"]
        generate = {"task": "alpha", "inputs": "x", "max_new_tokens": 2}
        reading = [
            ("GET", "/tasks", {}), ("GET", "/tasks/alpha", {}), ("POST", "/generate", {"json": generate}),
            ("POST", "/generate", {"json": {**generate, "stream": True}}),
            ("POST", "/score", {"json": {"task": "alpha", "inputs": "x", "choices": ["a", "b"]}}),
            ("POST", "/v1/completions", {"json": {"model": "alpha", "prompt": "x", "max_tokens": 2}}),
            ("GET", "/v1/models", {}), ("GET", "/metrics", {}), ("GET", "/adapt", {}), ("GET", f"/adapt/{job_id}", {}),
            ("GET", "/openapi.json", {}), ("GET", "/docs", {}), ("GET", "/redoc", {}),
        ]
        for method, path, kwargs in reading:
            assert_needs_key(client, method, path, 200, **kwargs)
        assert_needs_key(client, "GET", "/tasks/nope", 404)  # the key is checked before anything is revealed
        for path in ("/healthz", "/readyz"):
            assert client.get(path).status_code == 200
        assert wait_job(client, job_id, headers={"X-API-Key": KEY})["state"] == "succeeded"
        assert_needs_key(client, "GET", "/tasks/done/lora", 200)
        assert_needs_key(client, "DELETE", "/tasks/done", 200)


def test_a_request_the_kv_pool_cannot_hold_as_it_grows_is_413_naming_the_field(t5_bundle):
    """A beam search whose beams outgrow a pool that holds one row of the largest input and output (the smallest
    the settings allow): 413 naming max_new_tokens and the settings to raise (it hung before: queued again, the
    search started over); one beam of the same request is served."""
    with TestClient(create_app(bundle_settings(t5_bundle, max_batch_tokens=81, max_num_beams=8))) as client:
        body = {"task": "alpha", "inputs": ["x" * 40], "max_new_tokens": 16, "num_beams": 8}
        error = assert_error(client.post("/generate", json=body), 413, "too_large")
        assert error["field"] == "max_new_tokens" and "MHR_KV_CACHE_BYTES" in error["message"], error
        assert client.post("/generate", json={**body, "num_beams": 1}).status_code == 200
