"""Arrow routed once per request (granularity "prompt") against a dense reference written out here: each layer's
mix from the bare backbone's inputs to it, averaged over the prompt's tokens, then W + ΔW for every token."""

import asyncio

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM, T5ForConditionalGeneration

from adapter_store import AdapterStore
from adapter_store.arrow import ArrowError, ArrowSpec, library_of_skills, library_of_tasks
from adapter_store.arrow_spec import spec_of
from server.app import create_app
from tests.factories import save_bundle
from tests.server.conftest import bundle_settings, serving, texts

ROUTE = {"route": "arrow", "over": "skills", "top_k": 2, "temperature": 0.5, "granularity": "prompt"}


def dense_mixes(model, library, ids: torch.Tensor, top_k: int, temperature: float, seq2seq: bool) -> dict:
    """Each layer's w (J,): the bare model's input to the layer, |x·p_j| / T averaged over the tokens it reads
    (T5's decoder layers read the start token), top_k kept, softmax over those."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen.__setitem__(name, args[0][0])) for name, *_ in library.layers()]
    with torch.no_grad():
        if seq2seq:
            model(input_ids=ids, decoder_input_ids=torch.zeros((1, 1), dtype=torch.long))
        else:
            model(input_ids=ids)
    for handle in handles:
        handle.remove()
    mixes = {}
    for name, p, _, _ in library.layers():
        x = seen[name]  # (T, d_in)
        s = torch.stack([(x @ p[j]).abs().mean() for j in range(p.shape[0])]) / temperature
        kept = s.topk(top_k).indices
        w = torch.zeros_like(s)
        w[kept] = torch.softmax(s[kept], dim=0)
        mixes[name] = w
    return mixes


class Fixed(nn.Module):
    """base(x) + x ΔWᵀ-free: x @ (Σ_j w_j A_j) @ (Σ_j w_j B_j) / r, formed densely as one d_in × d_out matrix."""

    def __init__(self, base: nn.Linear, delta: torch.Tensor):
        super().__init__()
        self.base, self.delta = base, delta

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        return self.base(x) + x @ self.delta


def reference_for(model_cls, folder, library, ids, top_k, temperature, seq2seq):
    """A fresh copy of the backbone whose layers carry this prompt's fixed mix."""
    bare = model_cls.from_pretrained(folder / "model").eval()
    mixes = dense_mixes(bare, library, ids, top_k, temperature, seq2seq)
    model = model_cls.from_pretrained(folder / "model").eval()
    for name, _, a, b in library.layers():
        w = mixes[name]
        a_mix = sum(w[j] * a[j] for j in range(len(w)))
        b_mix = sum(w[j] * b[j] for j in range(len(w)))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Fixed(getattr(parent, child), (a_mix @ b_mix) * library.scale))
    return model, mixes


@pytest.mark.parametrize("over", ["skills", "tasks"])
def test_generate_equals_the_dense_reference(module_client, t5_bundle, tokenizer, over):
    store = AdapterStore.open(t5_bundle / "inventory")
    library = library_of_skills(store) if over == "skills" else library_of_tasks(store)
    inputs = ["hello prompt routing", "a much longer input, padded beside the other one"]
    response = module_client.post("/generate", json={"task": {**ROUTE, "over": over}, "inputs": inputs,
                                                      "max_new_tokens": 6})
    got = texts(response)
    for text, out in zip(inputs, got, strict=True):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        reference, _ = reference_for(T5ForConditionalGeneration, t5_bundle, library, ids, 2, 0.5, True)
        with torch.no_grad():
            expected = reference.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        assert out == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_score_and_explain_equal_the_dense_reference(module_client, t5_bundle, tokenizer):
    store = AdapterStore.open(t5_bundle / "inventory")
    library = library_of_skills(store)
    ids = tokenizer("score me", return_tensors="pt")["input_ids"]
    reference, mixes = reference_for(T5ForConditionalGeneration, t5_bundle, library, ids, 2, 0.5, True)
    response = module_client.post("/score", json={"task": ROUTE, "inputs": ["score me"], "choices": ["yes", "no!"]})
    assert response.status_code == 200, response.text
    for choice in response.json()["results"][0]["scores"]:
        labels = tokenizer([choice["choice"]], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = reference(input_ids=ids, labels=labels).logits
        expected = F.log_softmax(logits, -1).gather(-1, labels[..., None]).sum()
        assert choice["logprob_sum"] == pytest.approx(float(expected), abs=1e-3)
    explained = module_client.post("/route/explain", json={"task": ROUTE, "input": "score me", "top": 4}).json()
    assert explained["granularity"] == "prompt" and "granularity=prompt" in explained["task"]
    assert {layer["layer"] for layer in explained["layers"]} == set(mixes)  # every layer, the decoder's too
    for layer in explained["layers"]:
        want = {f"skill-{j}": float(w) for j, w in enumerate(mixes[layer["layer"]]) if w > 0}
        assert {e["expert"]: e["weight"] for e in layer["top"]} == pytest.approx(want, abs=1e-5)
    average = torch.stack(list(mixes.values())).mean(0)
    assert explained["average"] == pytest.approx({f"skill-{j}": float(w) for j, w in enumerate(average)}, abs=1e-5)
    generated = module_client.post("/generate", json={"task": ROUTE, "inputs": "score me"}).json()
    assert generated["routing"] == pytest.approx(explained["average"], abs=1e-5)


def test_a_causal_lm_equals_the_dense_reference(tmp_path):
    """Llama: every layer reads the whole prompt; left padding beside a longer input changes nothing."""
    save_bundle(tmp_path, "llama", task_names=["alpha", "beta", "gamma"])
    library = library_of_tasks(AdapterStore.open(tmp_path / "inventory"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    inputs = ["short", "a longer causal input"]
    with TestClient(create_app(bundle_settings(tmp_path))) as client:
        body = {"task": {**ROUTE, "over": "tasks"}, "inputs": inputs, "max_new_tokens": 5}
        got = texts(client.post("/generate", json=body))
    for text, out in zip(inputs, got, strict=True):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        reference, _ = reference_for(LlamaForCausalLM, tmp_path, library, ids, 2, 0.5, False)
        with torch.no_grad():
            expected = reference.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        assert out == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_prompt_rows_decode_beside_token_rows_and_plain_rows(t5_bundle):
    app = create_app(bundle_settings(t5_bundle, max_batch_wait_ms=50))
    bodies = [{"task": ROUTE, "inputs": ["side by side", "two"], "max_new_tokens": 8},
              {"task": {**ROUTE, "granularity": "token"}, "inputs": ["side by side"], "max_new_tokens": 8},
              {"task": "beta", "inputs": ["side by side", "another row"], "max_new_tokens": 8}]

    async def run():
        async with serving(app) as http:
            alone = [await http.post("/generate", json=body) for body in bodies]
            together = await asyncio.gather(*(http.post("/generate", json=body) for body in bodies))
            return alone, together

    alone, together = asyncio.run(run())
    assert [texts(r) for r in together] == [texts(r) for r in alone]
    assert together[0].json()["routing"] == pytest.approx(alone[0].json()["routing"], abs=1e-5)
    assert together[0].json()["routing"] != pytest.approx(together[1].json()["routing"], abs=1e-3)


def test_top_1_over_tasks_is_a_plain_lora_per_layer(module_client):
    """Each layer keeps one task's LoRA: the explanation's weights are one-hot per layer."""
    route = {**ROUTE, "over": "tasks", "top_k": 1}
    body = module_client.post("/route/explain", json={"task": route, "input": "one hot", "top": 3}).json()
    for layer in body["layers"]:
        assert [e["weight"] for e in layer["top"]] == pytest.approx([1.0])


@pytest.mark.parametrize("value", ["sentence", "", "Prompt"])
def test_a_bad_granularity_names_its_field(module_client, value):
    route = {**ROUTE, "granularity": value}
    for path, extra in (("/generate", {"inputs": "x"}), ("/score", {"inputs": "x", "choices": ["a"]}),
                        ("/route/explain", {"input": "x"})):
        response = module_client.post(path, json={"task": route, **extra})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "task.granularity"
    made = module_client.post("/tasks", json={"name": "bad-granularity", "route": route})
    assert made.status_code == 422 and made.json()["error"]["field"] == "route.granularity"


@pytest.mark.parametrize("value", [1, None, ["prompt"]])
def test_a_granularity_of_the_wrong_type_is_refused(module_client, value):
    """Not a string: pydantic refuses it (the task is a name, a mix or a route, so it names the task)."""
    response = module_client.post("/generate", json={"task": {**ROUTE, "granularity": value}, "inputs": "x"})
    assert response.status_code == 422 and response.json()["error"]["field"].startswith("task")


def test_named_prompt_routes_persist_their_granularity(tmp_path):
    save_bundle(tmp_path, "t5", task_names=["alpha", "beta", "gamma"])
    with TestClient(create_app(bundle_settings(tmp_path))) as client:
        made = client.post("/tasks", json={"name": "once", "route": ROUTE})
        assert made.status_code == 201, made.text
        assert made.json()["route"] == {"over": "skills", "top_k": 2, "temperature": 0.5, "granularity": "prompt"}
        named = client.post("/generate", json={"task": "once", "inputs": "name me"}).json()
        inline = client.post("/generate", json={"task": ROUTE, "inputs": "name me"}).json()
        per_token = client.post("/generate", json={"task": {**ROUTE, "granularity": "token"},
                                                   "inputs": "name me"}).json()
        assert named["routing"] == pytest.approx(inline["routing"]) and named["outputs"] == inline["outputs"]
        assert named["routing"] != pytest.approx(per_token["routing"], abs=1e-3)
    info = AdapterStore.open(tmp_path / "inventory").task("once")
    assert dict(info.route)["granularity"] == "prompt"


def test_the_spec_validates_and_names_granularity():
    with pytest.raises(ArrowError) as caught:
        ArrowSpec("skills", 2, 1.0, "sentence")
    assert caught.value.field == "granularity"
    assert ArrowSpec("skills", 2, 1.0, "prompt").name == "arrow(over=skills,top_k=2,temperature=1,granularity=prompt)"
    assert ArrowSpec("skills", 2, 1.0).name == "arrow(over=skills,top_k=2,temperature=1)"  # names kept from before
    old = (("over", "tasks"), ("temperature", 1.0), ("top_k", 2))  # a route saved before granularity existed
    assert spec_of(old).granularity == "token"
