"""Few-shot adaptation: methods train only what they should, loss goes down, jobs over HTTP, restarts."""

import json
import shutil
import time

import pytest
import torch
from fastapi.testclient import TestClient

from adapter_store import AdapterCache, AdapterStore
from server.adapt import METHODS, Example, TrainConfig
from server.adapt.data import make_batch
from server.adapt.trainer import train
from server.app import create_app
from server.engine import Engine, load_model
from tests.factories import save_bundle
from tests.server.conftest import bundle_settings

INPUTS = [f"example {i} text" for i in range(16)]


@pytest.fixture
def folder(t5_bundle, tmp_path):
    shutil.copytree(t5_bundle, tmp_path / "bundle")
    return tmp_path / "bundle"


@pytest.fixture(scope="module")
def soft_bundle(tmp_path_factory):
    """Not sharpened: a loss on the scale of log(vocabulary), where a few steps show."""
    folder = tmp_path_factory.mktemp("soft")
    save_bundle(folder, "t5", sharp=False)
    return folder


@pytest.mark.parametrize("method", ["mhr-z", "poly-z", "mhr-mu"])
def test_training_lowers_the_loss_and_touches_only_its_parameters(soft_bundle, method):
    store = AdapterStore.open(soft_bundle / "inventory")
    engine = Engine(load_model(soft_bundle / "model", device="cpu"), store, AdapterCache(10**8))
    examples = [Example(text, "abab") for text in INPUTS]
    backbone = {k: v.clone() for k, v in engine.model.state_dict().items()}
    skills = [g.lora_a.clone() for g in store.inventory.groups]
    trainer = METHODS[method](store)
    config = TrainConfig(steps=30, learning_rate=trainer.default_learning_rate * (1 if method != "mhr-mu" else 10),
                         batch_size=8, seed=0, validation_fraction=0.0, max_seconds=120)
    losses = []
    train(engine, trainer, examples, config, cancelled=lambda: False, on_progress=lambda p: losses.append(p.loss))
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    assert all(torch.equal(v, engine.model.state_dict()[k]) for k, v in backbone.items())
    assert all(torch.equal(a, g.lora_a) for a, g in zip(skills, store.inventory.groups, strict=True))


def test_trainable_parameter_counts(folder):
    store = AdapterStore.open(folder / "inventory")
    cfg, layers = store.inventory.config, len(store.inventory.module_names)
    assert METHODS["mhr-z"](store).trainable_parameters == layers * cfg.n_splits * cfg.n_skills
    assert METHODS["poly-z"](store).trainable_parameters == layers * cfg.n_skills
    lora = sum((d_in + d_out) * cfg.r for d_in, d_out in store.inventory.module_shapes.values())
    assert METHODS["mhr-mu"](store).trainable_parameters == lora


def wait_for(client, job_id, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/adapt/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job still {job['state']} after {timeout} s")


def test_adapt_over_http_then_serve_then_restart(folder):
    settings = bundle_settings(folder)
    with TestClient(create_app(settings)) as client:
        examples = [{"input": f"item {i}", "target": "ab"} for i in range(12)]
        response = client.post("/adapt", json={"task": "new-task", "examples": examples, "steps": 25,
                                               "validation_fraction": 0.25})
        assert response.status_code == 202, response.text
        job = wait_for(client, response.json()["id"])
        assert job["state"] == "succeeded" and job["version"] == 1 and job["step"] == 25
        assert job["trainable_parameters"] > 0 and job["validation_exact_match"] is not None
        assert job["id"] in [j["id"] for j in client.get("/adapt").json()["jobs"]]
        assert client.get("/tasks/new-task").json()["kind"] == "adapted"
        body = {"task": "new-task", "inputs": ["item 99", "item 100"], "max_new_tokens": 4}
        served = client.post("/generate", json=body).json()
        assert served["version"] == 1
    with TestClient(create_app(settings)) as client:  # a restart keeps the task and its outputs
        assert client.post("/generate", json=body).json()["outputs"] == served["outputs"]
        again = client.post("/adapt", json={"task": "new-task", "examples": examples[:4], "steps": 2,
                                            "overwrite": True})
        assert wait_for(client, again.json()["id"])["version"] == 2
        assert client.get("/tasks/new-task").json()["version"] == 2


def test_bad_adapt_requests_write_nothing(folder):
    settings = bundle_settings(folder, adapt_max_examples=4, adapt_max_steps=50)
    ok = [{"input": "a", "target": "b"}]
    with TestClient(create_app(settings)) as client:
        first = client.post("/adapt", json={"task": "taken", "examples": ok, "steps": 1})
        wait_for(client, first.json()["id"])
        cases = [
            ({"task": "taken", "examples": ok}, 409, "task"),
            ({"task": "alpha", "examples": ok}, 409, "task"),
            ({"task": "__mu__", "examples": ok}, 422, "task"),
            ({"task": "new", "examples": []}, 422, "examples"),
            ({"task": "new", "examples": ok * 5}, 422, "examples"),
            ({"task": "new", "examples": [{"input": "", "target": "b"}]}, 422, "examples.0.input"),
            ({"task": "new", "examples": [{"input": "a"}]}, 422, "examples.0.target"),
            ({"task": "new", "examples": [{"input": "a" * 100, "target": "b"}], "steps": 1}, 422, "examples.0.input"),
            ({"task": "new", "examples": ok, "steps": 51}, 422, "steps"),
            ({"task": "new", "examples": ok, "steps": 0}, 422, "steps"),
            ({"task": "new", "examples": ok, "method": "lora"}, 422, "method"),
            ({"task": "../evil", "examples": ok}, 422, "task"),
            ({"task": ".hidden", "examples": ok}, 422, "task"),
            ({"task": "new", "examples": ok, "learning_rate": -1}, 422, "learning_rate"),
        ]
        for body, status, field in cases:
            response = client.post("/adapt", json=body)
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"]["field"] == field and response.json()["error"]["message"], body
        assert client.get("/tasks/new").status_code == 404
        assert client.get("/adapt/nope").status_code == 404
    adapted = folder / "inventory" / "adapted"
    assert sorted(p.name for p in adapted.glob("*.safetensors")) == ["taken.safetensors"]
    assert not list(adapted.glob(".tmp-*"))


def test_cancel_and_interrupted_jobs(folder):
    settings = bundle_settings(folder)
    examples = [{"input": f"x{i}", "target": "y"} for i in range(4)]
    with TestClient(create_app(settings)) as client:
        long_job = client.post("/adapt", json={"task": "slow", "examples": examples, "steps": 2000}).json()
        queued = client.post("/adapt", json={"task": "later", "examples": examples, "steps": 5}).json()
        assert client.delete(f"/adapt/{queued['id']}").json()["state"] == "cancelled"
        assert client.delete(f"/adapt/{long_job['id']}").json()["cancel_requested"] is True
        assert wait_for(client, long_job["id"])["state"] == "cancelled"
        finished = client.delete(f"/adapt/{long_job['id']}")
        assert finished.status_code == 409 and "already ended" in finished.json()["error"]["message"]
        assert client.get("/tasks/slow").status_code == 404 and client.get("/tasks/later").status_code == 404
    # a record left "running" by a killed process is reported failed after a restart
    jobs_dir = folder / "inventory" / "adapted" / ".jobs"
    record = json.loads((jobs_dir / f"{long_job['id']}.json").read_text())
    record["state"] = "running"
    (jobs_dir / f"{long_job['id']}.json").write_text(json.dumps(record))
    with TestClient(create_app(settings)) as client:
        job = client.get(f"/adapt/{long_job['id']}").json()
        assert job["state"] == "failed" and "interrupted" in job["error"]


def test_api_key_guards_mutating_routes(folder):
    settings = bundle_settings(folder, api_key="s3cret")
    body = {"task": "guarded", "examples": [{"input": "a", "target": "b"}], "steps": 1}
    with TestClient(create_app(settings)) as client:
        assert client.post("/adapt", json=body).status_code == 401
        assert client.post("/adapt", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert client.get("/tasks").status_code == 200
        ok = client.post("/adapt", json=body, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 202
        wait_for(client, ok.json()["id"])
        assert client.delete("/tasks/guarded").status_code == 401
        assert client.delete("/tasks/guarded", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.delete("/tasks/alpha", headers={"Authorization": "Bearer s3cret"}).status_code == 409


def test_an_empty_target_is_learnt_as_an_immediate_end_of_sequence(soft_bundle, tmp_path):
    store = AdapterStore.open(soft_bundle / "inventory", tmp_path / "adapted")
    engine = Engine(load_model(soft_bundle / "model", device="cpu"), store, AdapterCache(10**8))
    batch = make_batch(engine.tokenizer, True, [Example("aei", ""), Example("abc", "x")], "cpu")
    eos = engine.tokenizer.eos_token_id
    assert batch["labels"][0].tolist()[:1] == [eos] and (batch["labels"][0, 1:] == -100).all()
    examples = [Example(text, "") for text in INPUTS]
    trainer = METHODS["mhr-mu"](store)
    config = TrainConfig(steps=30, learning_rate=1e-2, batch_size=8, seed=0, validation_fraction=0.0, max_seconds=120)
    losses = []
    train(engine, trainer, examples, config, cancelled=lambda: False, on_progress=lambda p: losses.append(p.loss))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    engine.close()


def test_empty_targets_are_accepted_over_http(folder):
    with TestClient(create_app(bundle_settings(folder))) as client:
        examples = [{"input": "aei", "target": ""}, {"input": "abc", "target": "bc"}]
        response = client.post("/adapt", json={"task": "devowel", "examples": examples, "steps": 3})
        assert response.status_code == 202, response.text
        assert wait_for(client, response.json()["id"])["state"] == "succeeded"
