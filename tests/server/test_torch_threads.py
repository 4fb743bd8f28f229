"""Torch runs on the serving loop's thread, or in threads that end (server/torch_threads.py).

libgomp keeps an OpenMP team for every thread that ran parallel work, for as long as that thread lives; with more
threads in teams than cores it stops spinning between parallel regions, and every parallel region of the serving
loop then waits for a sleeping worker. Measured on the demo over HTTP before this rule held: 551 -> 196 tokens/s with
one client, for the rest of the server's life, after one /route/explain had built Arrow's library in asyncio's
pooled thread. These tests watch every thread the app starts and fail if a thread that is still alive at the end
(other than the serving loop) called into torch.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import types

import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.torch_threads import in_own_thread, run_in_own_thread
from tests.factories import save_bundle

from .conftest import bundle_settings

# calls that only read a tensor's metadata or storage address: they never start a parallel region
METADATA = {"data_ptr", "untyped_storage", "nbytes", "is_contiguous", "size", "dim", "stride", "numel",
            "element_size", "storage_offset", "get_device", "is_floating_point", "__len__", "is_grad_enabled"}


class TorchCallers:
    """A profile hook (threading.setprofile): the threads that called a torch function or tensor method, each with
    its first such call (what, where)."""

    def __init__(self) -> None:
        self.first: dict[threading.Thread, tuple[str, str]] = {}

    def __call__(self, frame, event, arg) -> None:
        if event != "c_call" or not _is_torch(arg):
            return
        name = getattr(arg, "__name__", "")
        thread = threading.current_thread()
        if name not in METADATA and thread not in self.first:
            self.first[thread] = (getattr(arg, "__qualname__", name), f"{frame.f_code.co_filename}:{frame.f_lineno}")

    def lasting(self) -> dict[str, tuple[str, str]]:
        """The threads still alive (after a moment for those about to end), the serving loop's apart."""
        found = {}
        for thread, call in self.first.items():
            if thread.name != "serving-loop" and thread is not threading.main_thread():
                thread.join(timeout=2)
                if thread.is_alive():
                    found[thread.name] = call
        return found


def _is_torch(function) -> bool:
    owner = getattr(function, "__self__", None)
    if isinstance(owner, types.ModuleType):
        return owner.__name__.startswith("torch")
    return isinstance(owner, torch.Tensor) or type(owner).__module__.startswith("torch")


@pytest.fixture
def watched():
    """Every thread started from here on is watched (the app's event loop, its pooled threads, the serving loop,
    the adaptation worker)."""
    callers = TorchCallers()
    threading.setprofile(callers)
    try:
        yield callers
    finally:
        threading.setprofile(None)


def _wait_for_job(client, job_id: str) -> dict:
    for _ in range(600):
        job = client.get(f"/adapt/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.parametrize("shared_store", [False, True])
def test_requests_leave_torch_to_the_serving_loop(watched, t5_bundle, tmp_path, shared_store):
    """shared_store: the store re-read as other servers change it, job records with a heartbeat (a cluster's)."""
    arrow_tasks = {"route": "arrow", "over": "tasks", "top_k": 2}
    settings = bundle_settings(t5_bundle, adapted_dir=tmp_path / "adapted", shared_store=shared_store)
    with TestClient(create_app(settings)) as client:
        def ok(response, status=200):
            assert response.status_code == status, response.text
            return response.json() if "json" in response.headers.get("content-type", "") else response

        ok(client.post("/generate", json={"task": "alpha", "inputs": ["hello", "abc"], "max_new_tokens": 4}))
        ok(client.post("/generate", json={"task": {"mix": {"alpha": 0.5, "beta": 0.5}}, "inputs": "hi",
                                          "max_new_tokens": 4}))
        ok(client.post("/generate", json={"task": arrow_tasks, "inputs": "hello", "max_new_tokens": 4}))
        ok(client.post("/generate", json={"task": "beta", "inputs": "hi", "max_new_tokens": 4, "logprobs": 2,
                                          "guided": {"regex": "[a-z]+"}}))
        ok(client.post("/generate", json={"task": "beta", "inputs": "hi", "max_new_tokens": 4, "num_beams": 2}))
        ok(client.post("/generate", json={"task": "gamma", "inputs": "hi", "max_new_tokens": 4, "stream": True}))
        ok(client.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 3, "logprobs": 1}))
        for over in ("skills", "tasks"):
            ok(client.post("/route/explain", json={"task": {**arrow_tasks, "over": over}, "input": "hello"}))
        ok(client.post("/score", json={"task": {"route": "arrow", "over": "skills"}, "inputs": "hello",
                                       "choices": ["a", "b"]}))
        ok(client.post("/tasks", json={"name": "alpha-beta", "mix": {"alpha": 0.7, "beta": 0.3}}), 201)
        ok(client.post("/tasks", json={"name": "routed", "route": arrow_tasks}), 201)
        ok(client.get("/tasks/alpha-beta/lora"))
        examples = [{"input": f"in {i}", "target": f"out {i}"} for i in range(8)]
        for method, extra in (("mhr-z", {"validation_fraction": 0.25}), ("mhr-mu", {}), ("retrieve", {})):
            job = ok(client.post("/adapt", json={"task": f"new-{method}", "examples": examples, "method": method,
                                                 "steps": 2, "batch_size": 4, **extra}), 202)
            assert _wait_for_job(client, job["id"])["state"] == "succeeded"
        ok(client.delete("/tasks/new-mhr-z"))
        lasting = watched.lasting()
    assert not lasting, f"threads that outlive their work called torch (first call, where): {lasting}"
    assert sys.getprofile() is None


def test_own_threads_end_with_their_work():
    """The engine's build, an explanation, an export: each in a thread that ends with it, its result or error
    handed back."""
    seen = []

    def build(value):
        seen.append(threading.current_thread())
        return value * 2

    def failing():
        raise ValueError("corrupt inventory")

    async def main():
        assert await in_own_thread(build, 21) == 42
        seen[0].join(timeout=5)
        assert seen[0] is not threading.main_thread() and not seen[0].is_alive()
        with pytest.raises(ValueError, match="corrupt inventory"):
            await in_own_thread(failing)

    asyncio.run(main())
    assert run_in_own_thread(build, 4) == 8
    seen[-1].join(timeout=5)
    assert not seen[-1].is_alive()
    with pytest.raises(ValueError, match="corrupt inventory"):
        run_in_own_thread(failing)


def test_causal_requests_leave_torch_to_the_serving_loop(watched, tmp_path):
    """A causal LM's own paths: OpenAI's echo with prompt log-probabilities (teacher-forced chunks on the loop),
    /score, a plain and a streamed completion."""
    save_bundle(tmp_path / "llama", "llama", task_names=["alpha", "beta", "gamma"])
    with TestClient(create_app(bundle_settings(tmp_path / "llama", adapted_dir=tmp_path / "adapted"))) as client:
        for body in ({"model": "alpha", "prompt": "hello", "max_tokens": 0, "echo": True, "logprobs": 1},
                     {"model": "beta", "prompt": ["hi", "there"], "max_tokens": 3},
                     {"model": "gamma", "prompt": "hi", "max_tokens": 3, "stream": True}):
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
        response = client.post("/score", json={"task": "alpha", "inputs": "hello", "choices": ["a", "bc"]})
        assert response.status_code == 200, response.text
        lasting = watched.lasting()
    assert not lasting, f"threads that outlive their work called torch (first call, where): {lasting}"
