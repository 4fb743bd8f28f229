"""Adapted tasks end to end over HTTP: in mixed batches with pretrained and μ tasks, re-adapted (overwrite)
and deleted while the server holds their old version (merged weights, resident adapters, cache) — a
server that ran the old version answers as a fresh server started on the new one."""

import asyncio
import shutil

import pytest

from server.app import create_app
from tests.server.conftest import await_job, bundle_settings, send_together, serving, texts

PROBES = ["probe one", "item 3", "another probe"]


def shots(target: str) -> list[dict]:
    return [{"input": f"item {i}", "target": target} for i in range(8)]


# learning rates high enough that 10 steps change the greedy text of this (unsharpened) model
VERSIONS = {
    "z-task": [{"method": "mhr-z", "learning_rate": 1.0, "examples": shots("abab")},
               {"method": "mhr-z", "learning_rate": 1.0, "examples": shots("zzzz")}],
    "mu-task": [{"method": "mhr-mu", "learning_rate": 0.05, "examples": shots("abab")},
                {"method": "mhr-mu", "learning_rate": 0.05, "examples": shots("zzzz")}],
    "poly-task": [{"method": "poly-z", "learning_rate": 1.0, "examples": shots("qrqr")}],
}


async def adapt(http, task: str, spec: dict, overwrite: bool = False) -> dict:
    response = await http.post("/adapt", json={"task": task, "steps": 10, "overwrite": overwrite, **spec})
    assert response.status_code == 202, response.text
    job = await await_job(http, response.json()["id"])
    assert job["state"] == "succeeded", job
    return job


def mixed(tasks: list[str]) -> list[dict]:
    """One request per (task, probe): a batch that mixes every task."""
    return [{"task": task, "inputs": probe, "max_new_tokens": 8} for probe in PROBES[:2] for task in tasks]


def single(task: str) -> dict:
    """One request of one task: a single-task batch (the merged-weights path when merging is on)."""
    return {"task": task, "inputs": PROBES, "max_new_tokens": 8}


async def observe(http, tasks: list[str]) -> dict:
    """Each task alone, each adapted task's log-likelihoods, and all of them in one mixed batch."""
    seen = {}
    for task in tasks:
        response = await http.post("/generate", json=single(task))
        seen[("alone", task)] = (texts(response), response.json()["version"])
        if "-task" not in task:
            continue
        score = await http.post("/score", json={"task": task, "inputs": PROBES[0], "choices": ["abab", "zzzz"]})
        assert score.status_code == 200, score.text
        seen[("score", task)] = [c["logprob_sum"] for c in score.json()["results"][0]["scores"]]
    responses, batched = await send_together(http, mixed(tasks))
    assert batched, "the requests were not batched together"
    seen["mixed"] = [texts(r) for r in responses]
    return seen


def fresh(settings, tasks: list[str]) -> dict:
    """What a newly started server answers."""
    async def scenario():
        async with serving(create_app(settings)) as http:
            return await observe(http, tasks)

    return asyncio.run(scenario())


def assert_same(served: dict, expected: dict) -> None:
    for key, value in expected.items():
        if key[0] == "score":
            assert served[key] == pytest.approx(value, abs=1e-3), key
        else:
            assert served[key] == value, key


@pytest.fixture
def folder(printable_bundle, tmp_path):
    shutil.copytree(printable_bundle, tmp_path / "bundle")
    return tmp_path / "bundle"


def settings_for(folder, **overrides):
    return bundle_settings(folder, max_batch_size=16, max_batch_wait_ms=50, **overrides)


def test_mixed_batches_with_adapted_tasks_equal_each_request_alone(folder):
    tasks = ["z-task", "mu-task", "poly-task", "alpha", "__mu__", "beta"]

    async def scenario():
        async with serving(create_app(settings_for(folder))) as http:
            for task in ("z-task", "mu-task", "poly-task"):
                await adapt(http, task, VERSIONS[task][0])
            bodies = mixed(tasks)
            alone = [texts(await http.post("/generate", json=body)) for body in bodies]
            responses, batched = await send_together(http, bodies)
            scores = await http.post("/score", json={"task": "mu-task", "inputs": PROBES, "choices": ["ab", "zz"]})
            return alone, [texts(r) for r in responses], batched, scores

    alone, together, batched, scores = asyncio.run(scenario())
    assert batched, "the requests were not batched together"
    assert together == alone
    by_task = {}
    for body, text in zip(mixed(tasks), alone, strict=True):
        by_task.setdefault(body["task"], []).append(text)
    assert len({str(v) for v in by_task.values()}) == len(tasks)  # every task answers differently
    assert scores.status_code == 200


@pytest.mark.parametrize("merge", [True, False], ids=["merge", "no-merge"])
def test_readapted_task_is_served_as_a_fresh_server_serves_it(folder, merge):
    settings = settings_for(folder, merge_single_task=merge)
    tasks = ["z-task", "mu-task", "alpha", "__mu__"]

    async def scenario():
        async with serving(create_app(settings)) as http:
            for task in ("z-task", "mu-task"):
                await adapt(http, task, VERSIONS[task][0])
            old = await observe(http, tasks)
            old_again = await observe(http, tasks)  # the old versions are now merged / resident / cached
            for task in ("z-task", "mu-task"):
                assert (await adapt(http, task, VERSIONS[task][1], overwrite=True))["version"] == 2
            return old, old_again, await observe(http, tasks)

    old, old_again, new = asyncio.run(scenario())
    assert old_again == old
    for task in ("z-task", "mu-task"):
        assert old[("alone", task)][1] == 1 and new[("alone", task)][1] == 2
        assert new[("alone", task)][0] != old[("alone", task)][0], task  # the new version really differs
        assert new[("score", task)] != pytest.approx(old[("score", task)], abs=1e-2), task
    assert_same(new, fresh(settings, tasks))


def test_deleted_task_is_404_and_a_task_adapted_again_under_its_name_is_served_fresh(folder):
    settings = settings_for(folder)
    tasks = ["z-task", "mu-task", "alpha"]

    async def scenario():
        async with serving(create_app(settings)) as http:
            for task in ("z-task", "mu-task"):
                await adapt(http, task, VERSIONS[task][0])
            before = await observe(http, tasks)
            assert (await http.delete("/tasks/z-task")).status_code == 200
            assert not (folder / "inventory" / "adapted" / "z-task.safetensors").exists()
            gone = [await http.post("/generate", json=single("z-task")),
                    await http.post("/generate", json={**single("z-task"), "stream": True}),
                    await http.post("/score", json={"task": "z-task", "inputs": "x", "choices": ["a"]}),
                    await http.post("/v1/completions", json={"model": "z-task", "prompt": "x", "max_tokens": 2}),
                    await http.get("/tasks/z-task"), await http.get("/tasks/z-task/lora")]
            listed = [t["name"] for t in (await http.get("/tasks")).json()["tasks"]]
            remaining = await observe(http, ["mu-task", "alpha"])
            # the same name again, with other content: version 1 again, but not the deleted adapter
            assert (await adapt(http, "z-task", VERSIONS["z-task"][1]))["version"] == 1
            return before, gone, listed, remaining, await observe(http, tasks)

    before, gone, listed, remaining, recreated = asyncio.run(scenario())
    for response in gone:
        assert response.status_code == 404, response.text
        assert response.json()["error"]["type"] == "unknown_task"
    assert "z-task" not in listed
    for key in (("alone", "mu-task"), ("alone", "alpha")):
        assert remaining[key] == before[key]
    assert recreated[("alone", "z-task")][0] != before[("alone", "z-task")][0]
    assert_same(recreated, fresh(settings, tasks))
