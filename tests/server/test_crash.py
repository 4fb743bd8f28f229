"""kill -9 during /adapt, then restart: no partial file, earlier tasks intact, the job shown failed.
SIGTERM: requests in flight finish, new ones are refused, a running adaptation job ends cancelled."""

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from bench.serving_http import free_port, start_server
from server.app import create_app
from tests.server.conftest import bundle_settings, sse_events


def start(folder: Path, port: int) -> subprocess.Popen:
    return start_server(folder / "model", folder / "inventory", folder / "inventory" / "adapted", port, 1)


def wait_state(base: str, job_id: str, states: set[str], timeout: float = 60, min_step: int = 0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{base}/adapt/{job_id}").json()
        if job["state"] in states and job["step"] >= min_step:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job not in {states}")


@pytest.mark.slow
def test_kill_9_during_adapt_then_restart(t5_bundle, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(t5_bundle, folder)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    examples = [{"input": f"in {i}", "target": "out"} for i in range(8)]
    proc = start(folder, port)
    try:
        done = httpx.post(f"{base}/adapt", json={"task": "kept", "examples": examples, "steps": 3}).json()
        assert wait_state(base, done["id"], {"succeeded"})["version"] == 1
        before = httpx.post(f"{base}/generate", json={"task": "kept", "inputs": "probe", "max_new_tokens": 5}).json()
        running = httpx.post(f"{base}/adapt", json={"task": "doomed", "examples": examples, "steps": 2000}).json()
        wait_state(base, running["id"], {"running"}, min_step=2)  # provably training when killed
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    adapted = folder / "inventory" / "adapted"
    # what a kill in the middle of writing a task leaves: the first half of a temp file
    kept_bytes = (adapted / "kept.safetensors").read_bytes()
    (adapted / ".tmp-doomed-cut.safetensors").write_bytes(kept_bytes[: len(kept_bytes) // 2])
    with TestClient(create_app(bundle_settings(folder))) as client:  # the restart, in this process
        assert not list(adapted.glob(".tmp-*")) and not (adapted / "doomed.safetensors").exists()
        assert sorted(p.name for p in adapted.glob("*.safetensors")) == ["kept.safetensors"]
        job = client.get(f"/adapt/{running['id']}").json()
        assert job["state"] == "failed" and "interrupted" in job["error"]
        assert client.get("/tasks/doomed").status_code == 404
        assert [t["name"] for t in client.get("/tasks").json()["tasks"] if t["kind"] == "adapted"] == ["kept"]
        after = client.post("/generate", json={"task": "kept", "inputs": "probe", "max_new_tokens": 5}).json()
        assert after["outputs"] == before["outputs"] and after["version"] == 1


def read_events(base: str, body: dict, first_piece: threading.Event, out: dict) -> None:
    """Stream one /generate request; set `first_piece` when text arrives; keep status, pieces, done event."""
    out["pieces"], out["done"] = [""] * len(body["inputs"]), None
    try:
        with httpx.stream("POST", f"{base}/generate", json=body, timeout=120) as response:
            out["status"] = response.status_code
            for event, data in sse_events(response.iter_lines()):
                if event == "done":
                    out["done"], out["done_at"] = data, time.monotonic()
                elif event is None:
                    out["pieces"][data["index"]] += data["text"]
                    first_piece.set()
                else:
                    out["error"] = data
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    finally:
        first_piece.set()


def refused(base: str) -> bool:
    """A new request is refused: the connection is, or the answer is 503 with Retry-After."""
    try:
        response = httpx.post(f"{base}/generate", json={"task": "alpha", "inputs": "late", "max_new_tokens": 1},
                              timeout=10)
    except httpx.TransportError:
        return True
    if response.status_code == 503:
        assert int(response.headers["retry-after"]) >= 1
        return True
    assert response.status_code == 200, response.text  # sent before the server began to shut down
    return False


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_cancels_adapt_jobs(printable_bundle, tmp_path):
    """The printable bundle never ends a sequence early: each streamed row runs to 256 tokens (seconds)."""
    adapted = tmp_path / "adapted"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(printable_bundle / "model", printable_bundle / "inventory", adapted, port, 1,
                        extra_env={"MHR_MAX_BATCH_WAIT_MS": "300"})  # the streams start together
    try:
        examples = [{"input": f"in {i}", "target": "out"} for i in range(8)]
        job = httpx.post(f"{base}/adapt", json={"task": "doomed", "examples": examples, "steps": 2000}).json()
        wait_state(base, job["id"], {"running"}, min_step=1)
        bodies = [{"task": task, "inputs": [f"row {i} of {task}" for i in range(4)], "max_new_tokens": 256,
                   "stream": True} for task in ("alpha", "beta", "gamma", "__mu__")]
        results = [{} for _ in bodies]
        started = [threading.Event() for _ in bodies]
        threads = [threading.Thread(target=read_events, args=(base, body, event, out))
                   for body, event, out in zip(bodies, started, results, strict=True)]
        for thread in threads:
            thread.start()
        for event in started:
            assert event.wait(60)
        assert all(r.get("done") is None and "error" not in r for r in results), results  # all in flight
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        deadline = signalled + 20
        while not refused(base):
            assert time.monotonic() < deadline, "new requests still accepted 20 s after SIGTERM"
            time.sleep(0.05)
        refused_at = time.monotonic()
        for thread in threads:
            thread.join(timeout=120)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after shutting down
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for result in results:
        assert result["status"] == 200 and "error" not in result, result.get("error")
        assert result["done"]["outputs"] and all(o["completion_tokens"] == 256 and o["finish_reason"] == "length"
                                                 for o in result["done"]["outputs"])
        assert result["pieces"] == [o["text"] for o in result["done"]["outputs"]]
    assert refused_at < min(r["done_at"] for r in results), "the new request was refused only after the others ended"
    # the shutdown cancelled the adaptation job (after a kill it would show failed, "interrupted"): nothing written
    assert not list(adapted.glob("*.safetensors")) and not list(adapted.glob(".tmp-*"))
    with TestClient(create_app(bundle_settings(printable_bundle, adapted_dir=adapted))) as client:
        ended = client.get(f"/adapt/{job['id']}").json()
        assert ended["state"] == "cancelled" and ended["error"] is None, ended
        assert client.get("/tasks/doomed").status_code == 404


@pytest.mark.slow
def test_idle_connections_are_closed_after_the_keep_alive_setting(t5_bundle, tmp_path):
    port = free_port()
    proc = start_server(t5_bundle / "model", t5_bundle / "inventory", tmp_path / "adapted", port, 1,
                        extra_env={"MHR_KEEP_ALIVE_S": "1"})
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = b""
            while not response.endswith(b"}"):  # headers and body may arrive in separate reads
                response += conn.recv(4096)
            assert response.startswith(b"HTTP/1.1 200")
            idle_from = time.monotonic()
            assert conn.recv(4096) == b""  # blocks until the server closes the idle connection (end-of-stream)
            assert 0.8 < time.monotonic() - idle_from < 5  # after the 1 s keep-alive, not at once
    finally:
        proc.terminate()
        proc.wait(timeout=30)
