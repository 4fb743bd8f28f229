"""kill -9 during /adapt, then restart: no partial file, earlier tasks intact, the job shown failed."""

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

from bench.serving_http import free_port, start_server


def start(folder: Path, port: int) -> subprocess.Popen:
    return start_server(folder / "model", folder / "inventory", folder / "inventory" / "adapted", port, 1)


def wait_state(base: str, job_id: str, states: set[str], timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{base}/adapt/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
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
        wait_state(base, running["id"], {"running"})
        time.sleep(0.5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    adapted = folder / "inventory" / "adapted"
    proc = start(folder, port)
    try:
        assert not list(adapted.glob(".tmp-*")) and not (adapted / "doomed.safetensors").exists()
        job = httpx.get(f"{base}/adapt/{running['id']}").json()
        assert job["state"] == "failed" and "interrupted" in job["error"]
        assert httpx.get(f"{base}/tasks/doomed").status_code == 404
        after = httpx.post(f"{base}/generate", json={"task": "kept", "inputs": "probe", "max_new_tokens": 5}).json()
        assert after["outputs"] == before["outputs"] and after["version"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests(t5_bundle, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(t5_bundle, port)
    results = []

    def call():
        body = {"task": "alpha", "inputs": ["a", "b", "c", "d"], "max_new_tokens": 16, "num_beams": 4}
        results.append(httpx.post(f"{base}/generate", json=body, timeout=60).status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    assert results == [200] * 4


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
            time.sleep(2.5)  # idle past the 1 s keep-alive: the server closes, a read sees end-of-stream
            assert conn.recv(4096) == b""
    finally:
        proc.terminate()
        proc.wait(timeout=30)
