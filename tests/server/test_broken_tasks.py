"""A corrupt or truncated file in the adapted folder at start-up: the server starts and serves everything else,
/readyz and GET /tasks report the file with its reason, the task's requests answer 409 naming the file, and adapting
it again (overwrite) or deleting it brings it back or removes it. A corrupt inventory still stops start-up."""

import asyncio
import shutil

import pytest

from adapter_store import InventoryError
from server.app import create_app
from tests.server.conftest import await_job, bundle_settings, send_together, serving

EXAMPLES = [{"input": f"in {i}", "target": "out"} for i in range(8)]


def test_a_truncated_task_file_is_reported_refused_and_can_be_readapted_or_deleted(t5_bundle, tmp_path):
    asyncio.run(_broken(t5_bundle, tmp_path))


async def _broken(t5_bundle, tmp_path):
    settings = bundle_settings(t5_bundle, adapted_dir=tmp_path / "adapted")
    async with serving(create_app(settings)) as http:
        for task in ("bad", "worse"):
            job = (await http.post("/adapt", json={"task": task, "examples": EXAMPLES, "steps": 2})).json()
            assert (await await_job(http, job["id"]))["state"] == "succeeded"
    for task in ("bad", "worse"):
        path = tmp_path / "adapted" / f"{task}.safetensors"
        path.write_bytes(path.read_bytes()[:-40])

    async with serving(create_app(settings)) as http:
        ready = (await http.get("/readyz")).json()
        assert ready["status"] == "ready"
        adapted = tmp_path / "adapted"
        assert [(b["name"], b["file"]) for b in ready["broken_tasks"]] == [
            ("bad", str(adapted / "bad.safetensors")), ("worse", str(adapted / "worse.safetensors"))]
        listed = {t["name"]: t for t in (await http.get("/tasks")).json()["tasks"]}
        assert listed["bad"]["kind"] == "broken" and "bad.safetensors" in listed["bad"]["reason"]
        assert (await http.get("/tasks/bad")).json()["kind"] == "broken"
        for path, body in (("/generate", {"task": "bad", "inputs": "abc"}),
                           ("/score", {"task": "bad", "inputs": "abc", "choices": ["x", "y"]}),
                           ("/v1/completions", {"model": "bad", "prompt": "abc"})):
            refused = await http.post(path, json=body)
            assert refused.status_code == 409, (path, refused.text)
            error = refused.json()["error"]
            assert error["type"] == "broken_task" and "bad.safetensors" in error["message"]
        assert (await http.get("/tasks/bad/lora")).status_code == 409
        together = [{"task": task, "inputs": f"abc {i}"} for i, task in enumerate(["alpha", "bad", "beta"] * 2)]
        responses, _ = await send_together(http, together)
        assert [r.status_code for r in responses] == [200, 409, 200] * 2  # only the broken task's rows fail

        again = (await http.post("/adapt", json={"task": "bad", "examples": EXAMPLES, "steps": 2})).json()
        assert again["error"]["type"] == "conflict"  # it exists: overwrite it
        job = (await http.post("/adapt", json={"task": "bad", "examples": EXAMPLES, "steps": 2,
                                               "overwrite": True})).json()
        assert (await await_job(http, job["id"]))["state"] == "succeeded"
        assert (await http.post("/generate", json={"task": "bad", "inputs": "abc"})).status_code == 200

        deleted = await http.delete("/tasks/worse")
        assert deleted.status_code == 200 and deleted.json()["kind"] == "broken"
        assert not (tmp_path / "adapted" / "worse.safetensors").exists()
        assert (await http.get("/tasks/worse")).status_code == 404
        assert (await http.get("/readyz")).json()["broken_tasks"] == []


def test_a_corrupt_inventory_still_stops_start_up_naming_the_file(t5_bundle, tmp_path):
    shutil.copytree(t5_bundle / "inventory", tmp_path / "inventory")
    (tmp_path / "inventory" / "tasks.json").write_text("{not json")
    settings = bundle_settings(t5_bundle, inventory=tmp_path / "inventory")
    with pytest.raises(InventoryError, match="tasks.json"):
        asyncio.run(_start(settings))


async def _start(settings):
    async with serving(create_app(settings)):
        pass
