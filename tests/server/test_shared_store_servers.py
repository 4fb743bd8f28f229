"""Servers sharing one store, without Ray: two servers on one adapted folder see each other's new, overwritten and
deleted tasks within 1 s and each other's jobs (a job whose server died: failed for everyone)."""

import asyncio
import contextlib
import json
import time

import httpx

from server.adapt.records import STALE_S
from server.app import create_app
from tests.server.conftest import await_job, bundle_settings, serving

EXAMPLES = [{"input": f"in {i}", "target": "out"} for i in range(8)]
VISIBLE_WITHIN_S = 1.0


async def _until(check, timeout: float):
    """Poll the async check until it returns a truthy value; (value, seconds it took)."""
    start = time.monotonic()
    while True:
        value = await check()
        if value or time.monotonic() - start > timeout:
            return value, time.monotonic() - start
        await asyncio.sleep(0.02)


async def _has_version(http: httpx.AsyncClient, task: str, version: int) -> bool:
    response = await http.get(f"/tasks/{task}")
    return response.status_code == 200 and response.json()["version"] == version


@contextlib.asynccontextmanager
async def _two_servers(t5_bundle, tmp_path):
    """Two servers (two apps, each with its own store and engine) on one shared adapted folder."""
    settings = bundle_settings(t5_bundle, adapted_dir=tmp_path / "adapted", shared_store=True)
    async with serving(create_app(settings)) as a, serving(create_app(settings)) as b:
        yield a, b


def test_servers_sharing_a_store_serve_each_others_tasks_within_a_second(t5_bundle, tmp_path):
    asyncio.run(_servers_sharing_a_store_serve_each_others_tasks_within_a_second(t5_bundle, tmp_path))


async def _servers_sharing_a_store_serve_each_others_tasks_within_a_second(t5_bundle, tmp_path):
    async with _two_servers(t5_bundle, tmp_path) as (a, b):
        job = (await a.post("/adapt", json={"task": "shared", "examples": EXAMPLES, "steps": 3})).json()
        assert (await b.get(f"/adapt/{job['id']}")).json()["task"] == "shared"  # b reads a's record
        done = await await_job(b, job["id"])
        assert done["state"] == "succeeded" and done["version"] == 1
        assert (await _until(lambda: _has_version(b, "shared", 1), VISIBLE_WITHIN_S))[0]
        assert time.time() - done["finished"] < VISIBLE_WITHIN_S
        probe = {"task": "shared", "inputs": ["abc", "hello"], "max_new_tokens": 6}
        first = (await b.post("/generate", json=probe)).json()
        assert first == (await a.post("/generate", json=probe)).json()

        # overwritten through b while a holds version 1 in its adapter cache: a serves version 2 within 1 s
        again = (await b.post("/adapt", json={"task": "shared", "examples": EXAMPLES[:4], "steps": 3, "seed": 1,
                                              "overwrite": True})).json()
        assert (await await_job(a, again["id"]))["state"] == "succeeded"
        assert (await _until(lambda: _has_version(a, "shared", 2), VISIBLE_WITHIN_S))[0]
        second = (await a.post("/generate", json=probe)).json()
        assert second["version"] == 2 and second == (await b.post("/generate", json=probe)).json()

        # deleted through a: 404 on b within 1 s, on every route that names the task
        assert (await a.delete("/tasks/shared")).status_code == 200
        gone, took = await _until(lambda: _gone(b, "shared"), VISIBLE_WITHIN_S)
        assert gone and took <= VISIBLE_WITHIN_S
        assert (await b.post("/generate", json=probe)).status_code == 404
        assert (await b.post("/v1/completions", json={"model": "shared", "prompt": "x"})).status_code == 404


async def _gone(http: httpx.AsyncClient, task: str) -> bool:
    return (await http.get(f"/tasks/{task}")).status_code == 404


def test_a_job_is_cancelled_through_another_server(t5_bundle, tmp_path):
    asyncio.run(_a_job_is_cancelled_through_another_server(t5_bundle, tmp_path))


async def _a_job_is_cancelled_through_another_server(t5_bundle, tmp_path):
    async with _two_servers(t5_bundle, tmp_path) as (a, b):
        job = (await a.post("/adapt", json={"task": "long", "examples": EXAMPLES, "steps": 2000})).json()
        asked = await b.delete(f"/adapt/{job['id']}")
        assert asked.status_code == 200 and asked.json()["cancel_requested"] is True
        assert (await await_job(b, job["id"], timeout=30))["state"] == "cancelled"
        assert (await b.get("/tasks/long")).status_code == 404
        assert (await a.delete(f"/adapt/{job['id']}")).status_code == 409


def test_a_job_whose_server_died_is_failed_for_everyone(t5_bundle, tmp_path):
    asyncio.run(_a_job_whose_server_died_is_failed_for_everyone(t5_bundle, tmp_path))


async def _a_job_whose_server_died_is_failed_for_everyone(t5_bundle, tmp_path):
    adapted = tmp_path / "adapted"
    settings = bundle_settings(t5_bundle, adapted_dir=adapted, shared_store=True)
    now = time.time()
    (adapted / ".jobs").mkdir(parents=True)
    record = {"id": "dead", "task": "orphan", "method": "mhr-z", "steps": 100, "examples": 8, "state": "running",
              "step": 40, "created": now - 60, "started": now - 50, "owner": "gone:1:x", "heartbeat": now - STALE_S - 1}
    (adapted / ".jobs" / "dead.json").write_text(json.dumps(record))
    (adapted / ".jobs" / "alive.json").write_text(json.dumps({**record, "id": "alive", "heartbeat": now + 60}))
    async with serving(create_app(settings)) as a:
        dead = (await a.get("/adapt/dead")).json()
        assert dead["state"] == "failed" and "stopped" in dead["error"] and dead["step"] == 40
        assert (await a.get("/adapt/alive")).json()["state"] == "running"  # another server's live job: as it says
        states = {j["id"]: j["state"] for j in (await a.get("/adapt")).json()["jobs"]}
        assert states == {"dead": "failed", "alive": "running"}
    assert json.loads((adapted / ".jobs" / "dead.json").read_text())["state"] == "running"  # readers never write


def test_a_task_another_server_just_wrote_is_served_not_404_inside_the_refresh_window(t5_bundle, tmp_path):
    asyncio.run(_just_written(t5_bundle, tmp_path))


async def _just_written(t5_bundle, tmp_path):
    """The cluster's 404 for an existing task, without Ray: b looks at the folder (GET /tasks), a writes a task,
    b is asked for it before its next look is due (store_refresh_s 60 here, 0.25 s by default)."""
    shared = bundle_settings(t5_bundle, adapted_dir=tmp_path / "adapted", shared_store=True)
    slow = shared.model_copy(update={"store_refresh_s": 60.0})
    async with serving(create_app(shared)) as a, serving(create_app(slow)) as b:
        assert (await b.get("/tasks")).status_code == 200  # b's look: fresh for 60 s
        job = (await a.post("/adapt", json={"task": "kept", "examples": EXAMPLES, "steps": 2})).json()
        assert (await await_job(a, job["id"]))["state"] == "succeeded"
        probe = {"task": "kept", "inputs": ["abc", "hello"], "max_new_tokens": 6}
        served = await b.post("/generate", json=probe)
        assert served.status_code == 200, served.text
        assert served.json() == (await a.post("/generate", json=probe)).json()
