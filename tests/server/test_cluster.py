"""Scale-out: the relay the cluster's ingress uses, and a real local Ray Serve cluster (2 engine replicas behind the
ingress; skipped where ray[serve] is not installed). Servers sharing a store without Ray: test_shared_store_servers.py.

Without Ray: a request relayed through serve_asgi gets the bytes a direct request gets. With Ray: outputs equal the
single-process server's; a task's requests go to the replica holding it; a task adapted through the cluster is
served in its new version by every replica within 1 s, deleted -> 404 everywhere; kill -9 of a replica under a
steady stream fails no idempotent request and loses no adapted task.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from bench.serving_http import free_port
from server.adapt.records import STALE_S
from server.app import create_app
from server.cluster.relay import RelayedRequest, ResponseStart, serve_asgi
from server.cluster.routing import idempotent, model_id
from server.settings import Settings
from tests.factories import save_bundle
from tests.server.conftest import bundle_settings, serving

EXAMPLES = [{"input": f"in {i}", "target": "out"} for i in range(8)]
VISIBLE_WITHIN_S = 1.0


# ---- routing: the model id and what may be sent again ---------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "body", "expected"), [
    ("POST", "/generate", {"task": "alpha", "inputs": "x"}, "alpha"),
    ("POST", "/score", {"task": "beta", "inputs": "x", "choices": ["a"]}, "beta"),
    ("POST", "/v1/completions", {"model": "gamma", "prompt": "x"}, "gamma"),
    ("POST", "/v1/chat/completions", {"model": "gamma", "messages": []}, "gamma"),
    ("POST", "/v1/completions", {"model": "gamma", "prompt": "x", "mix": {"alpha": 1}}, ""),
    ("POST", "/generate", {"task": {"mix": {"alpha": 1}}, "inputs": "x"}, ""),
    ("POST", "/generate", {"task": "../etc", "inputs": "x"}, ""),
    ("POST", "/generate", {"task": 3}, ""),
    ("POST", "/adapt", {"task": "alpha", "examples": []}, ""),
    ("GET", "/tasks/alpha/lora", None, "alpha"),
    ("GET", "/tasks/alpha", None, ""),
])
def test_model_id_is_the_task_a_request_is_served_with(method, path, body, expected):
    assert model_id(method, path, json.dumps(body).encode() if body is not None else b"") == expected


def test_model_id_of_a_body_that_is_not_json_is_empty():
    assert model_id("POST", "/generate", b"{not json") == ""


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", "/tasks", True), ("POST", "/generate", True), ("POST", "/score", True), ("POST", "/v1/completions", True),
    ("POST", "/adapt", False), ("POST", "/tasks", False), ("DELETE", "/tasks/x", False), ("DELETE", "/adapt/j", False),
])
def test_only_requests_that_change_nothing_are_sent_again(method, path, expected):
    assert idempotent(method, path) is expected


# ---- the relay: a request run through the app in another process --------------------------------------------
def _relayed(method: str, path: str, body: dict | None = None) -> RelayedRequest:
    data = json.dumps(body).encode() if body is not None else b""
    headers = ((b"host", b"test"), (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()))
    return RelayedRequest(method, path, b"", headers, data, ("127.0.0.1", 1234))


async def _through_relay(app, request: RelayedRequest) -> tuple[ResponseStart, bytes]:
    items = [item async for item in serve_asgi(app, request, [(b"x-mhr-replica", b"r1")])]
    assert isinstance(items[0], ResponseStart) and all(isinstance(i, bytes) for i in items[1:])
    return items[0], b"".join(items[1:])


def test_relayed_requests_get_what_direct_requests_get(t5_bundle):
    asyncio.run(_relayed_requests_get_what_direct_requests_get(t5_bundle))


async def _relayed_requests_get_what_direct_requests_get(t5_bundle):
    app = create_app(bundle_settings(t5_bundle))
    async with serving(app) as http:
        for method, path, body in [
            ("POST", "/generate", {"task": "alpha", "inputs": ["abc", "hello"], "max_new_tokens": 6}),
            ("POST", "/score", {"task": "beta", "inputs": "abc", "choices": ["x", "yz"]}),
            ("POST", "/generate", {"task": "nope", "inputs": "abc"}),
            ("POST", "/generate", {"task": "alpha", "inputs": "abc", "max_new_tokens": 10**6}),
            ("GET", "/tasks", None),
        ]:
            direct = await http.request(method, path, json=body)
            start, content = await _through_relay(app, _relayed(method, path, body))
            assert (start.status, json.loads(content)) == (direct.status_code, direct.json())
            assert start.header(b"x-mhr-replica") == b"r1"
        streamed = {"task": "alpha", "inputs": "abc", "max_new_tokens": 6, "stream": True}
        direct = await http.post("/generate", json=streamed)
        start, content = await _through_relay(app, _relayed("POST", "/generate", streamed))
        assert start.header(b"content-type").startswith(b"text/event-stream") and content.decode() == direct.text


# ---- a real local Ray Serve cluster ---------------------------------------------------------------------------
try:
    import ray
    from ray import serve
except ImportError:  # the cluster extra is not installed
    ray = serve = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray[serve] is not installed: pip install -e '.[cluster]'")
TASKS = [f"task-{c}" for c in "abcdefgh"]
REPLICAS = 2


@dataclass
class Cluster:
    url: str
    adapted: Path
    settings: dict


@needs_ray
def test_cluster_arguments_name_what_they_refuse():
    from server.cluster.app import ClusterArgs

    with pytest.raises(ValueError, match="unknown settings \\['max_batch'\\]"):
        ClusterArgs(settings={"max_batch": 4})
    with pytest.raises(ValueError, match="max_batch_size"):
        ClusterArgs(settings={"max_batch_size": 0})
    with pytest.raises(ValueError, match="tasks_per_replica"):
        ClusterArgs(tasks_per_replica=0)
    assert ClusterArgs.model_validate({"replicas": 3, "settings": {"threads": 1}}).replicas == 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """2 engine replicas (1 torch thread each) and the ingress on a Ray instance of this test's own (its own temp
    folder and ports), stopped after the module even when a test fails."""
    from server.cluster.__main__ import wait
    from server.cluster.app import ClusterArgs, build

    folder = tmp_path_factory.mktemp("cluster")
    save_bundle(folder, "t5", n_tasks=len(TASKS), task_names=TASKS)
    settings = {"model": str(folder / "model"), "inventory": str(folder / "inventory"),
                "adapted_dir": str(folder / "adapted"), "device": "cpu", "threads": 1, "max_batch_size": 4,
                "max_input_tokens": 64, "max_new_tokens": 16, "default_max_new_tokens": 8}
    temp_dir = tempfile.mkdtemp(prefix="mhr-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = ClusterArgs(replicas=REPLICAS, replica_cpus=1, ingress_cpus=0.5, tasks_per_replica=len(TASKS),
                           settings=settings)
        serve.run(build(args), name="mhr", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait(url, REPLICAS, timeout_s=180)
        yield Cluster(url, folder / "adapted", settings)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _replica(response: httpx.Response) -> str:
    return response.headers["x-mhr-replica"]


def _same_any_time(body):
    """An OpenAI response without what differs from call to call: its id and creation time."""
    return {k: v for k, v in body.items() if k not in ("id", "created")} if isinstance(body, dict) else body


def _sse(text: str) -> list[tuple[str | None, dict]]:
    """(event name, data) of each server-sent event."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines.get("event"), json.loads(lines["data"])))
    return events


@needs_ray
@pytest.mark.cluster
def test_outputs_equal_the_single_process_servers(cluster):
    requests = [
        ("POST", "/generate", {"task": "task-a", "inputs": ["abc", "hello world"], "max_new_tokens": 8}),
        ("POST", "/generate", {"task": "task-b", "inputs": "abc", "do_sample": True, "seed": 7, "max_new_tokens": 8}),
        ("POST", "/generate", {"task": {"mix": {"task-a": 0.7, "task-c": 0.3}}, "inputs": "xyz"}),
        ("POST", "/generate", {"task": "task-d", "inputs": "abc", "num_beams": 2, "max_new_tokens": 6}),
        ("POST", "/score", {"task": "task-c", "inputs": ["abc", "de"], "choices": ["x", "yz", "abc"]}),
        ("POST", "/v1/completions", {"model": "task-e", "prompt": "hello", "max_tokens": 6, "temperature": 0}),
        ("POST", "/generate", {"task": "no-such-task", "inputs": "abc"}),
        ("POST", "/generate", {"task": "task-a", "inputs": "abc", "max_new_tokens": 10**6}),
        ("POST", "/generate", {"task": "task-a", "inputs": "abc", "surprise": 1}),
        ("GET", "/tasks", None), ("GET", "/tasks/task-f", None), ("GET", "/v1/models", None),
    ]
    single = Settings(**{**cluster.settings, "adapted_dir": str(cluster.adapted.parent / "single-process")})
    threads = torch.get_num_threads()  # the reference runs with the replicas' 1 thread: bit-equal scores
    try:
        with TestClient(create_app(single)) as local, httpx.Client(base_url=cluster.url, timeout=60) as remote:
            for method, path, body in requests:
                expected, got = local.request(method, path, json=body), remote.request(method, path, json=body)
                assert (got.status_code, _same_any_time(got.json())) == (
                    expected.status_code, _same_any_time(expected.json())), (path, body)
            streamed = {"task": "task-a", "inputs": ["abc", "hello"], "max_new_tokens": 8, "stream": True}
            expected, got = local.post("/generate", json=streamed), remote.post("/generate", json=streamed)
            assert got.headers["content-type"].startswith("text/event-stream")
            assert _sse(got.text) == _sse(expected.text)
            chunks = {"model": "task-b", "prompt": "abc", "max_tokens": 6, "temperature": 0, "stream": True}
            assert remote.post("/v1/completions", json=chunks).text.endswith("data: [DONE]\n\n")
    finally:
        torch.set_num_threads(threads)


@needs_ray
@pytest.mark.cluster
def test_a_tasks_requests_go_to_the_replica_that_holds_it(cluster):
    with httpx.Client(base_url=cluster.url, timeout=60) as http:
        for task in TASKS:  # warm-up: each task becomes resident somewhere; the routers learn where
            for _round in range(2):
                assert http.post("/generate", json={"task": task, "inputs": "warm"}).status_code == 200
        time.sleep(1.0)
        served: dict[str, set[str]] = {task: set() for task in TASKS}
        for round_ in range(3):
            for task in TASKS:
                response = http.post("/generate", json={"task": task, "inputs": f"round {round_}"})
                assert response.status_code == 200 and response.headers["x-mhr-resident"] == "true", task
                served[task].add(_replica(response))
    assert len(set().union(*served.values())) == REPLICAS  # the tasks are spread over both replicas


def _observe(url: str, path: str, seconds: float, since: float) -> dict[str, list[tuple[float, httpx.Response]]]:
    """GET path over and over for `seconds` from 4 clients (no task: each request goes to a replica at random);
    per replica, (seconds since `since` when the request was sent, response)."""
    seen: dict[str, list[tuple[float, httpx.Response]]] = {}
    lock = threading.Lock()
    deadline = time.time() + seconds

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while (sent := time.time()) < deadline:
                response = http.get(path)
                with lock:
                    seen.setdefault(_replica(response), []).append((sent - since, response))

    threads = [threading.Thread(target=poll) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seen


def _stale_until(seen: dict[str, list[tuple[float, httpx.Response]]], fresh) -> float:
    """The latest time (since the change) at which any replica still answered the old state; every replica must
    have answered the new state too."""
    assert len(seen) == REPLICAS, f"only {sorted(seen)} answered"
    assert all(any(fresh(r) for _, r in answers) for answers in seen.values())
    return max((t for answers in seen.values() for t, r in answers if not fresh(r)), default=0.0)


def _job(http: httpx.Client, job_id: str, states=("succeeded", "failed", "cancelled"), timeout=120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/adapt/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['state']}")


@needs_ray
@pytest.mark.cluster
def test_a_task_adapted_through_the_cluster_is_served_by_every_replica_within_a_second(cluster):
    probe = {"task": "fresh", "inputs": "abc", "max_new_tokens": 6}
    with httpx.Client(base_url=cluster.url, timeout=60) as http:
        job = http.post("/adapt", json={"task": "fresh", "examples": EXAMPLES, "steps": 3}).json()
        answering = {_replica(http.get(f"/adapt/{job['id']}")) for _ in range(24)}
        assert len(answering) == REPLICAS  # the job's record is read by every replica
        done = _job(http, job["id"])
        assert done["state"] == "succeeded" and done["version"] == 1
        seen = _observe(cluster.url, "/tasks/fresh", 1.5, since=done["finished"])
        assert _stale_until(seen, lambda r: r.status_code == 200 and r.json()["version"] == 1) < VISIBLE_WITHIN_S
        assert http.post("/generate", json=probe).json()["version"] == 1

        again = http.post("/adapt", json={"task": "fresh", "examples": EXAMPLES[:4], "steps": 3, "seed": 1,
                                          "overwrite": True}).json()
        done = _job(http, again["id"])
        assert done["version"] == 2
        seen = _observe(cluster.url, "/tasks/fresh", 1.5, since=done["finished"])
        assert _stale_until(seen, lambda r: r.status_code == 200 and r.json()["version"] == 2) < VISIBLE_WITHIN_S
        assert http.post("/generate", json=probe).json()["version"] == 2  # the replica holding version 1 too

        deleted_at = time.time()
        assert http.delete("/tasks/fresh").status_code == 200
        seen = _observe(cluster.url, "/tasks/fresh", 1.5, since=deleted_at)
        assert _stale_until(seen, lambda r: r.status_code == 404) < VISIBLE_WITHIN_S
        gone = http.post("/generate", json=probe)
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "unknown_task"


@needs_ray
@pytest.mark.cluster
def test_kill_9_of_a_replica_under_a_steady_stream_fails_no_request_and_loses_no_task(cluster):
    with httpx.Client(base_url=cluster.url, timeout=120) as http:
        kept = http.post("/adapt", json={"task": "kept", "examples": EXAMPLES, "steps": 3}).json()
        assert _job(http, kept["id"])["state"] == "succeeded"
        probe = {"task": "kept", "inputs": ["abc", "hello"], "max_new_tokens": 8}
        before = http.post("/generate", json=probe).json()
        doomed = http.post("/adapt", json={"task": "doomed", "examples": EXAMPLES, "steps": 2000})
        assert doomed.status_code == 202, doomed.text
        victim, victim_pid = _replica(doomed), int(doomed.headers["x-mhr-replica-pid"])  # it runs the job
        _job(http, doomed.json()["id"], states=("running",))

        failures, answered, stop = [], [], threading.Event()

        def stream(worker: int) -> None:
            with httpx.Client(base_url=cluster.url, timeout=120) as client:
                for i in range(10**6):
                    if stop.is_set():
                        return
                    task = [*TASKS, "kept"][(worker + i) % (len(TASKS) + 1)]
                    response = (client.post("/generate", json={"task": task, "inputs": f"steady {i}"}) if i % 3
                                else client.post("/score", json={"task": task, "inputs": "abc", "choices": ["x", "y"]}))
                    (answered if response.status_code == 200 else failures).append((task, response))

        workers = [threading.Thread(target=stream, args=(w,)) for w in range(4)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(1.0)
            os.kill(victim_pid, signal.SIGKILL)
            killed_at = len(answered)
            known = {_replica(r) for _, r in answered[:killed_at]} | {victim}
            deadline, replacement = time.monotonic() + 120, None
            while time.monotonic() < deadline and replacement is None:  # no task: any replica, the new one too
                answer = http.get("/readyz")
                replacement = _replica(answer) if answer.status_code == 200 and _replica(answer) not in known else None
                time.sleep(0.2)
            time.sleep(1.0)
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert not failures, [(task, r.status_code, r.text[:200]) for task, r in failures[:5]]
        assert replacement, "no new replica answered within 120 s of the kill"
        assert len(answered) > killed_at + 10

        job = _job(http, doomed.json()["id"], states=("failed",), timeout=STALE_S + 30)
        assert "stopped" in job["error"] and http.get("/tasks/doomed").status_code == 404
        assert not (cluster.adapted / "doomed.safetensors").exists()
        after = http.post("/generate", json=probe).json()
        assert after == before and http.get("/tasks/kept").json()["version"] == 1
