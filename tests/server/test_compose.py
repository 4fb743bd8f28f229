"""Skill-space mixes over HTTP, named compositions (POST /tasks), and zero-training retrieval (/adapt retrieve)."""

import io
import shutil
import zipfile

import pytest
import torch
from fastapi.testclient import TestClient

from adapter_store import AdapterStore
from server.adapt.methods import METHODS, logits_for
from server.app import create_app
from tests.server.conftest import bundle_settings, metric, metric_values, wait_job

INPUTS = ["hello there", "abc", "xyz!"]


@pytest.fixture
def folder(t5_bundle, tmp_path):
    shutil.copytree(t5_bundle, tmp_path / "bundle")
    return tmp_path / "bundle"


def generate(client, task, inputs=INPUTS, **extra):
    response = client.post("/generate", json={"task": task, "inputs": inputs, "max_new_tokens": 8, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def texts(body):
    return [o["text"] for o in body["outputs"]]


def test_a_mix_is_served_like_a_task_and_its_adapter_is_cached(folder):
    with TestClient(create_app(bundle_settings(folder))) as client:
        alone = generate(client, {"mix": {"beta": 2.0}})
        assert texts(alone) == texts(generate(client, "beta"))
        assert alone["task"] == "mix(beta=1)" and alone["version"] is None
        mixed = {"mix": {"alpha": 0.7, "gamma": 0.3}}
        before = metric_values(client.get("/metrics").text)
        first = generate(client, mixed)
        second = generate(client, {"mix": {"gamma": 3, "alpha": 7}})  # the same mix, written otherwise
        after = metric_values(client.get("/metrics").text)
        assert texts(first) == texts(second)
        assert metric(after, "mhr_adapter_cache_misses_total") - metric(before, "mhr_adapter_cache_misses_total") == 1

        def logprob(task):
            response = client.post("/score", json={"task": task, "inputs": "abc", "choices": ["yes"]})
            assert response.status_code == 200, response.text
            return response.json()["results"][0]["scores"][0]["logprob_sum"]

        assert len({logprob(mixed), logprob("alpha"), logprob("gamma")}) == 3  # the mix is neither task
        completion = client.post("/v1/completions", json={"model": "any", "mix": mixed["mix"], "prompt": INPUTS[0],
                                                          "max_tokens": 8, "temperature": 0})
        assert completion.json()["choices"][0]["text"] == texts(first)[0]


def test_a_member_with_a_new_version_invalidates_the_mix(folder):
    settings = bundle_settings(folder)
    examples = [{"input": f"item {i}", "target": "ba"} for i in range(8)]
    with TestClient(create_app(settings)) as client:
        def adapt(**extra):
            job = client.post("/adapt", json={"task": "z", "examples": examples, "steps": 15, **extra}).json()
            assert wait_job(client, job["id"])["state"] == "succeeded"

        adapt(learning_rate=1.0)
        mixed = {"mix": {"z": 0.6, "beta": 0.4}}
        old = texts(generate(client, mixed))
        adapt(learning_rate=5.0, seed=3, overwrite=True)
        new = texts(generate(client, mixed))
    with TestClient(create_app(settings)) as fresh:
        assert texts(generate(fresh, mixed)) == new
    assert new != old


@pytest.mark.parametrize(("mix", "field"), [
    ({"nope": 1.0}, "task.mix.nope"),
    ({"alpha": -1.0}, "task.mix.alpha"),
    ({"alpha": 0.0}, "task.mix"),
    ({f"t{i}": 1.0 for i in range(17)}, "task.mix"),
])
def test_bad_mixes_are_422_naming_the_field(client, mix, field):
    response = client.post("/generate", json={"task": {"mix": mix}, "inputs": "x"})
    assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text


def test_a_plain_lora_task_cannot_join_a_mix(folder):
    with TestClient(create_app(bundle_settings(folder))) as client:
        job = client.post("/adapt", json={"task": "mu-task", "method": "mhr-mu", "steps": 1,
                                          "examples": [{"input": "a", "target": "b"}]}).json()
        wait_job(client, job["id"])
        response = client.post("/generate", json={"task": {"mix": {"alpha": 1, "mu-task": 1}}, "inputs": "x"})
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "task.mix.mu-task" and "plain LoRA" in response.text
        assert client.post("/tasks", json={"name": "c", "mix": {"mu-task": 1}}).status_code == 422


def test_named_compositions_persist_serve_export_and_break_when_a_member_goes(folder):
    settings = bundle_settings(folder, api_key="k")
    key = {"X-API-Key": "k"}
    examples = [{"input": f"item {i}", "target": "ab"} for i in range(8)]
    with TestClient(create_app(settings)) as client:
        assert client.post("/tasks", json={"name": "mixed", "mix": {"alpha": 1}}).status_code == 401
        job = client.post("/adapt", json={"task": "member", "examples": examples, "steps": 5}, headers=key).json()
        wait_job(client, job["id"])
        made = client.post("/tasks", json={"name": "mixed", "mix": {"member": 1, "gamma": 3}}, headers=key)
        assert made.status_code == 201, made.text
        assert made.json()["kind"] == "composed" and made.json()["mix"] == {"gamma": 0.75, "member": 0.25}
        listed = {t["name"]: t for t in client.get("/tasks").json()["tasks"]}
        assert listed["mixed"]["mix"] == {"gamma": 0.75, "member": 0.25} and listed["mixed"]["version"] == 1
        served = generate(client, "mixed")
        assert served["version"] == 1
        assert texts(served) == texts(generate(client, {"mix": {"member": 1, "gamma": 3}}))
        again = client.post("/tasks", json={"name": "mixed", "mix": {"alpha": 1}}, headers=key)
        assert again.status_code == 409
        export = client.get("/tasks/mixed/lora", headers=key)
        assert export.status_code == 200
        assert "mixed/adapter_model.safetensors" in zipfile.ZipFile(io.BytesIO(export.content)).namelist()
    with TestClient(create_app(settings)) as client:  # a restart keeps it, with the same outputs
        assert texts(generate(client, "mixed")) == texts(served)
        assert client.delete("/tasks/member", headers=key).status_code == 200
        broken = client.post("/generate", json={"task": "mixed", "inputs": "x"})
        assert broken.status_code == 409 and "'member', which no longer exists" in broken.json()["error"]["message"]
        fixed = client.post("/tasks", json={"name": "mixed", "mix": {"gamma": 1}, "overwrite": True}, headers=key)
        assert fixed.status_code == 201 and fixed.json()["version"] == 2
        assert texts(generate(client, "mixed")) == texts(generate(client, "gamma"))
        assert client.delete("/tasks/mixed", headers=key).status_code == 200
        assert client.post("/generate", json={"task": "mixed", "inputs": "x"}).status_code == 404


def test_retrieve_ranks_first_the_task_that_made_the_examples(printable_bundle, tmp_path):
    """(printable_bundle: every generated token is one character, so the examples' text re-tokenises to exactly
    the tokens the mix chose.)"""
    with TestClient(create_app(bundle_settings(printable_bundle, adapted_dir=tmp_path))) as client:
        inputs = [f"sample {i} text" for i in range(10)]
        # examples made by a held-out "task": mostly beta with a little alpha — beta shares most of its skills
        made = texts(generate(client, {"mix": {"beta": 0.85, "alpha": 0.15}}, inputs=inputs))
        examples = [{"input": x, "target": y} for x, y in zip(inputs, made, strict=True)]
        job = client.post("/adapt", json={"task": "found", "method": "retrieve", "examples": examples, "k": 2}).json()
        done = wait_job(client, job["id"])
        assert done["state"] == "succeeded", done
        candidates = done["result"]["candidates"]
        assert candidates[0]["task"] == "beta" and candidates[0]["loss"] < candidates[1]["loss"]
        assert {c["task"] for c in candidates} == {"alpha", "beta", "gamma", "__mu__"}
        assert set(done["result"]["mix"]) == {c["task"] for c in candidates[:2]}
        assert sum(done["result"]["mix"].values()) == pytest.approx(1.0)
        info = client.get("/tasks/found").json()
        assert info["kind"] == "composed" and info["method"] == "retrieve" and info["mix"] == pytest.approx(
            done["result"]["mix"])
        assert generate(client, "found")["version"] == 1
        warm = client.post("/adapt", json={"task": "warm", "init": "retrieve", "examples": examples, "steps": 2})
        warm_done = wait_job(client, warm.json()["id"])
        assert warm_done["state"] == "succeeded" and warm_done["result"]["candidates"][0]["task"] == "beta"
        bad = client.post("/adapt", json={"task": "x", "method": "mhr-mu", "init": "retrieve", "examples": examples})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "init"


@pytest.mark.parametrize("method", ["mhr-z", "poly-z"])
def test_starting_from_a_mix_gives_its_routing_weights(folder, method):
    store = AdapterStore.open(folder / "inventory", folder / "adapted")
    cfg = store.inventory.config
    weights = [torch.softmax(torch.randn(len(g.names), cfg.n_splits, cfg.n_skills), -1) for g in store.inventory.groups]
    if method == "poly-z":
        weights = [w.mean(dim=1, keepdim=True).expand_as(w).contiguous() for w in weights]
    trainer = METHODS[method](store)
    trainer.start_from(weights)
    for z, w in zip(trainer.logits(), weights, strict=True):
        p = torch.sigmoid(z.view(*w.shape))
        torch.testing.assert_close(p / p.sum(-1, keepdim=True), w, rtol=1e-4, atol=1e-6)
    assert torch.sigmoid(logits_for(torch.tensor([0.0, 1.0]))).min() > 0


@pytest.mark.parametrize("weight", [1e308, 1e-308])
def test_a_mix_of_huge_or_tiny_equal_weights_is_served_as_half_and_half(client, weight):
    body = {"task": {"mix": {"alpha": weight, "beta": weight}}, "inputs": "abc", "max_new_tokens": 6}
    served = client.post("/generate", json=body)
    assert served.status_code == 200 and served.json()["task"] == "mix(alpha=0.5,beta=0.5)"
    assert served.json() == client.post("/generate", json={**body, "task": {"mix": {"alpha": 1, "beta": 1}}}).json()
