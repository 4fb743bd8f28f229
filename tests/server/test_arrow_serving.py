"""Arrow served end to end: /generate and /score against a reference model whose layers route every token by
hand, Arrow rows decoding beside plain rows, the routing summary, /route/explain, validation."""

import asyncio
import copy

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from torch import nn
from transformers import AutoTokenizer, T5ForConditionalGeneration

from adapter_store import AdapterStore
from adapter_store.arrow import ArrowSpec, library_of_skills, library_of_tasks
from server.app import create_app
from tests.adapter_store.helpers import random_logits
from tests.factories import save_bundle
from tests.server.conftest import bundle_settings, serving, texts

ROUTE = {"route": "arrow", "over": "skills", "top_k": 2, "temperature": 0.5}


class ReferenceArrow(nn.Module):
    """base(x) + Σ_j w_j (x A_j B_j) / r, with w from every expert's |x·p_j| written out (no concatenation)."""

    def __init__(self, base: nn.Linear, p, a, b, top_k: int, temperature: float, scale: float):
        super().__init__()
        self.base, self.p, self.a, self.b = base, p, a, b
        self.top_k, self.temperature, self.scale = top_k, temperature, scale

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        sims = torch.stack([(x @ self.p[j]).abs() for j in range(self.p.shape[0])], dim=-1) / self.temperature
        top = sims.topk(self.top_k, dim=-1)
        w = torch.zeros_like(sims).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))
        out = self.base(x)
        for j in range(self.p.shape[0]):
            out = out + w[..., j:j + 1] * (x @ self.a[j] @ self.b[j]) * self.scale
        return out


def reference_model(bundle, library, top_k, temperature):
    model = T5ForConditionalGeneration.from_pretrained(bundle / "model").eval()
    model = copy.deepcopy(model)
    for name, p, a, b in library.layers():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, ReferenceArrow(getattr(parent, child), p, a, b, top_k, temperature, library.scale))
    return model


@pytest.mark.parametrize("over", ["skills", "tasks"])
def test_generate_equals_the_reference_model(module_client, t5_bundle, tokenizer, over):
    store = AdapterStore.open(t5_bundle / "inventory")
    library = library_of_skills(store) if over == "skills" else library_of_tasks(store)
    route = {**ROUTE, "over": over}
    reference = reference_model(t5_bundle, library, 2, 0.5)
    inputs = ["hello arrow", "a longer input, to pad the other one"]
    response = module_client.post("/generate", json={"task": route, "inputs": inputs, "max_new_tokens": 6})
    got = texts(response)
    for text, out in zip(inputs, got, strict=True):
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            expected = reference.generate(**ids, max_new_tokens=6, do_sample=False)
        assert out == tokenizer.decode(expected[0], skip_special_tokens=True)
    body = response.json()
    assert body["task"] == f"arrow(over={over},top_k=2,temperature=0.5)" and body["version"] is None
    assert set(body["routing"]) == set(library.experts)
    assert sum(body["routing"].values()) == pytest.approx(1.0, abs=1e-4)


def test_score_equals_the_reference_model(module_client, t5_bundle, tokenizer):
    store = AdapterStore.open(t5_bundle / "inventory")
    reference = reference_model(t5_bundle, library_of_skills(store), 2, 0.5)
    response = module_client.post("/score", json={"task": ROUTE, "inputs": ["score me"], "choices": ["yes", "no!"]})
    assert response.status_code == 200, response.text
    for choice in response.json()["results"][0]["scores"]:
        enc = tokenizer(["score me"], return_tensors="pt")
        labels = tokenizer([choice["choice"]], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = reference(**enc, labels=labels).logits
        expected = F.log_softmax(logits, -1).gather(-1, labels[..., None]).sum()
        assert choice["logprob_sum"] == pytest.approx(float(expected), abs=1e-3)


def test_arrow_rows_decode_beside_plain_rows(t5_bundle):
    """An Arrow request and a plain task's request in one running batch: each as it is alone."""
    app = create_app(bundle_settings(t5_bundle, max_batch_wait_ms=50))

    async def run():
        async with serving(app) as http:
            arrow = {"task": ROUTE, "inputs": ["side by side"], "max_new_tokens": 8}
            plain = {"task": "beta", "inputs": ["side by side", "another row"], "max_new_tokens": 8}
            alone = [await http.post("/generate", json=body) for body in (arrow, plain)]
            together = await asyncio.gather(*(http.post("/generate", json=body) for body in (arrow, plain)))
            return alone, together

    alone, together = asyncio.run(run())
    assert [texts(r) for r in together] == [texts(r) for r in alone]
    assert together[0].json()["routing"] == pytest.approx(alone[0].json()["routing"], abs=1e-5)
    assert together[1].json()["routing"] is None


def test_explain_lists_each_layers_top_experts(module_client, t5_bundle):
    response = module_client.post("/route/explain", json={"task": {**ROUTE, "top_k": 1}, "input": "explain", "top": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    store = AdapterStore.open(t5_bundle / "inventory")
    assert body["experts"] == ["skill-0", "skill-1", "skill-2", "skill-3"]
    # the layers that read the prompt's positions: the encoder's, and cross-attention's keys and values
    reading = {name for name in store.inventory.module_names
               if name.startswith("encoder.") or name.endswith(("EncDecAttention.k", "EncDecAttention.v"))}
    assert {layer["layer"] for layer in body["layers"]} == reading
    for layer in body["layers"]:
        weights = [e["weight"] for e in layer["top"]]
        assert weights == sorted(weights, reverse=True) and sum(weights) == pytest.approx(1.0, abs=1e-5)
    assert sum(body["average"].values()) == pytest.approx(1.0, abs=1e-5)
    generated = module_client.post("/generate", json={"task": {**ROUTE, "top_k": 1}, "inputs": "explain"}).json()
    assert generated["routing"] == pytest.approx(body["average"], abs=1e-5)  # the same summary


@pytest.mark.parametrize(("route", "field"), [
    ({"top_k": 0}, "task.top_k"), ({"top_k": 5}, "task.top_k"), ({"over": "experts"}, "task.over"),
    ({"temperature": 0.0}, "task.temperature"), ({"temperature": -1.0}, "task.temperature"),
    ({"over": "tasks", "top_k": 4}, "task.top_k"),
])
def test_bad_routes_name_their_field(module_client, route, field):
    for path, extra in (("/generate", {"inputs": "x"}), ("/score", {"inputs": "x", "choices": ["a"]}),
                        ("/route/explain", {"input": "x"})):
        response = module_client.post(path, json={"task": {**ROUTE, **route}, **extra})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == field


def test_score_reports_the_routing_generate_reports(module_client):
    scored = module_client.post("/score", json={"task": ROUTE, "inputs": ["same input"], "choices": ["a"]}).json()
    generated = module_client.post("/generate", json={"task": ROUTE, "inputs": "same input"}).json()
    assert scored["routing"] == pytest.approx(generated["routing"], abs=1e-5)


def test_beam_search_and_streaming_serve_arrow(module_client):
    beams = module_client.post("/generate", json={"task": ROUTE, "inputs": "beams", "num_beams": 2})
    assert beams.status_code == 200, beams.text
    greedy = module_client.post("/generate", json={"task": ROUTE, "inputs": "beams"})
    assert beams.json()["routing"] == pytest.approx(greedy.json()["routing"], abs=1e-5)
    with module_client.stream("POST", "/generate", json={"task": ROUTE, "inputs": "stream", "stream": True}) as sse:
        assert sse.status_code == 200
        body = "".join(sse.iter_text())
    assert '"routing"' in body


def test_a_readapted_task_changes_the_routing_over_tasks(tmp_path):
    """The library over tasks is keyed by every task's version: a re-adapted task is routed with its new LoRA."""
    save_bundle(tmp_path, "t5", task_names=["alpha", "beta", "gamma"])
    with TestClient(create_app(bundle_settings(tmp_path))) as client:
        engine = client.app.state.engine
        route = {"route": "arrow", "over": "tasks", "top_k": None}
        before = client.post("/generate", json={"task": route, "inputs": "x"}).json()["routing"]
        assert set(before) == {"alpha", "beta", "gamma"}
        engine.store.save_routing("new", "mhr-z", random_logits(engine.store, seed=1))
        first = client.post("/generate", json={"task": route, "inputs": "x"}).json()["routing"]
        assert set(first) == {"alpha", "beta", "gamma", "new"}
        key = engine.arrow_adapter(ArrowSpec("tasks", None)).key
        engine.store.save_routing("new", "mhr-z", random_logits(engine.store, seed=2), overwrite=True)
        assert engine.arrow_adapter(ArrowSpec("tasks", None)).key != key
        second = client.post("/generate", json={"task": route, "inputs": "x"}).json()["routing"]
        assert second["new"] != pytest.approx(first["new"], abs=1e-6)


def test_named_arrow_tasks(tmp_path):
    """POST /tasks {name, route}: persisted, versioned, listed, served as the inline route, deletable."""
    save_bundle(tmp_path, "t5", task_names=["alpha", "beta", "gamma"])
    route = {"route": "arrow", "over": "skills", "top_k": 2, "temperature": 0.5}
    with TestClient(create_app(bundle_settings(tmp_path))) as client:
        made = client.post("/tasks", json={"name": "zero-shot", "route": route})
        assert made.status_code == 201, made.text
        assert made.json()["route"] == {"over": "skills", "top_k": 2, "temperature": 0.5, "granularity": "token"}
        assert made.json()["version"] == 1 and made.json()["method"] == "arrow"
        listed = {t["name"]: t for t in client.get("/tasks").json()["tasks"]}
        assert listed["zero-shot"]["route"]["top_k"] == 2
        named = client.post("/generate", json={"task": "zero-shot", "inputs": "name me"}).json()
        inline = client.post("/generate", json={"task": route, "inputs": "name me"}).json()
        assert named["outputs"] == inline["outputs"] and named["routing"] == pytest.approx(inline["routing"])
        assert named["task"] == "zero-shot" and named["version"] == 1
        openai = client.post("/v1/completions", json={"model": "zero-shot", "prompt": "name me"})
        assert openai.status_code == 200 and openai.json()["choices"][0]["text"] == named["outputs"][0]["text"]
        conflict = client.post("/tasks", json={"name": "zero-shot", "route": route})
        assert conflict.status_code == 409
        again = client.post("/tasks", json={"name": "zero-shot", "route": {**route, "top_k": 1}, "overwrite": True})
        assert again.json()["version"] == 2
        bad = client.post("/tasks", json={"name": "other", "route": {**route, "top_k": 9}})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "route.top_k"
        both = client.post("/tasks", json={"name": "other", "route": route, "mix": {"alpha": 1.0}})
        assert both.status_code == 422
        mixed = client.post("/generate", json={"task": {"mix": {"zero-shot": 1.0}}, "inputs": "x"})
        assert mixed.status_code == 422 and mixed.json()["error"]["field"] == "task.mix.zero-shot"
        scored = client.post("/score", json={"task": "zero-shot", "inputs": "x", "choices": ["a"]}).json()
        assert scored["version"] == 2 and scored["routing"] is not None
    store = AdapterStore.open(tmp_path / "inventory")  # read back from disk by a new store
    info = store.task("zero-shot")
    assert info.version == 2 and dict(info.route) == {"over": "skills", "top_k": 1, "temperature": 0.5,
                                                      "granularity": "token"}
    with TestClient(create_app(bundle_settings(tmp_path))) as client:
        assert client.delete("/tasks/zero-shot").status_code == 200
        assert client.post("/generate", json={"task": "zero-shot", "inputs": "x"}).status_code == 404


def test_a_causal_lm_serves_arrow_as_the_reference(tmp_path):
    """Llama (left padding, per-row positions): each input's greedy text as the reference model's, alone."""
    from transformers import LlamaForCausalLM

    save_bundle(tmp_path, "llama", task_names=["alpha", "beta", "gamma"])
    store = AdapterStore.open(tmp_path / "inventory")
    library = library_of_tasks(store)
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "model").eval()
    for name, p, a, b in library.layers():
        parent_name, _, child = name.rpartition(".")
        parent = reference.get_submodule(parent_name)
        setattr(parent, child, ReferenceArrow(getattr(parent, child), p, a, b, 2, 0.5, library.scale))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    inputs = ["short", "a longer causal input"]
    with TestClient(create_app(bundle_settings(tmp_path))) as client:
        body = {"task": {**ROUTE, "over": "tasks"}, "inputs": inputs, "max_new_tokens": 5}
        got = texts(client.post("/generate", json=body))
    for text, out in zip(inputs, got, strict=True):
        ids = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            expected = reference.generate(**ids, max_new_tokens=5, do_sample=False)
        assert out == tokenizer.decode(expected[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_score_equals_peft_create_arrow_model(module_client, t5_bundle, tokenizer, tmp_path):
    """PEFT's own Arrow (create_arrow_model over each task's exported LoRA) scores as our route over tasks.
    PEFT's prototypes come from 15 power-iteration steps; they are replaced by ours (checked against a dense SVD
    in tests/adapter_store/test_arrow.py) so the comparison is of the routing and mixing, not of convergence."""
    from peft import ArrowConfig, create_arrow_model
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    store = AdapterStore.open(t5_bundle / "inventory")
    library = library_of_tasks(store)
    paths = [str(store.export_lora(task, tmp_path / task)) for task in library.experts]  # task_j = experts[j]
    base = T5ForConditionalGeneration.from_pretrained(t5_bundle / "model").eval()
    config = ArrowConfig(top_k=2, router_temperature=0.5, rng_seed=0)
    model = create_arrow_model(base, paths, config).eval()
    enc = tokenizer(["peft arrow"], return_tensors="pt")
    labels = tokenizer(["yes"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model(**enc, labels=labels)  # PEFT builds its prototypes lazily, at the first forward
    ours = {name: p for name, p, _, _ in library.layers()}
    replaced = 0
    for name, module in model.named_modules():
        if isinstance(module, ArrowLoraLinearLayer):
            layer = name.split("base_model.model.", 1)[1].rsplit(".lora_arrow", 1)[0]
            module.prototypes = ours[layer].clone()
            replaced += 1
    assert replaced == len(ours)
    with torch.no_grad():
        logits = model(**enc, labels=labels).logits
    expected = float(F.log_softmax(logits, -1).gather(-1, labels[..., None]).sum())
    route = {"route": "arrow", "over": "tasks", "top_k": 2, "temperature": 0.5}
    response = module_client.post("/score", json={"task": route, "inputs": ["peft arrow"], "choices": ["yes"]})
    assert response.json()["results"][0]["scores"][0]["logprob_sum"] == pytest.approx(expected, abs=1e-3)


def test_routes_kept_ready_are_bounded(module_client):
    from server.engine.engine import MAX_ARROW_ROUTES

    engine = module_client.app.state.engine
    for i in range(MAX_ARROW_ROUTES + 3):
        engine.arrow_adapter(ArrowSpec("skills", 2, 1.0 + i))
    assert len(engine._arrow_adapters) == MAX_ARROW_ROUTES
    first = engine.arrow_adapter(ArrowSpec("skills", 2, 1.0 + MAX_ARROW_ROUTES + 2))
    assert engine.arrow_adapter(ArrowSpec("skills", 2, 1.0 + MAX_ARROW_ROUTES + 2)) is first


def test_the_routing_summary_ignores_padding(module_client):
    """A short input padded beside a long one reports the routing it has alone (mean over its own tokens)."""
    short, long = "ab", "a much longer input than the other"
    alone = module_client.post("/generate", json={"task": ROUTE, "inputs": short}).json()["routing"]
    both = module_client.post("/generate", json={"task": ROUTE, "inputs": [short, long]}).json()["routing"]
    other = module_client.post("/generate", json={"task": ROUTE, "inputs": long}).json()["routing"]
    assert both == pytest.approx({k: (alone[k] + other[k]) / 2 for k in alone}, abs=1e-5)
