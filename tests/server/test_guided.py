"""Structured output (llguidance): outputs follow their JSON schema, regex or choice list, guided and free rows of
different tasks share decoding steps without changing the free rows' text, byte-level (ByT5) and fast tokenizers
both work, and what cannot be compiled is a 422 naming the field."""

import asyncio
import json
import re

import jsonschema
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.factories import save_bos_byte_tokenizer, save_bundle
from tests.server.conftest import bundle_settings, send_together, serving

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
LONG = {"max_new_tokens": 64}  # the longest object of SCHEMA is 55 bytes


@pytest.fixture(scope="module")
def t5_client(t5_bundle):
    with TestClient(create_app(bundle_settings(t5_bundle, **LONG))) as client:
        yield client


def generate(client, **body) -> dict:
    response = client.post("/generate", json={"task": "alpha", **LONG, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_json_schema_regex_and_choice_outputs_follow_them(t5_client):
    client = t5_client
    body = {"inputs": ["first", "second", "third"]}
    for seed in (None, 3):
        sampled = {"do_sample": True, "seed": seed} if seed is not None else {}
        outputs = generate(client, **body, **sampled, guided={"json_schema": SCHEMA})["outputs"]
        for output in outputs:
            jsonschema.validate(json.loads(output["text"]), SCHEMA)
            assert output["finish_reason"] == "stop"
        for output in generate(client, **body, **sampled, guided={"regex": r"[a-c]{2}-\d\d"})["outputs"]:
            assert re.fullmatch(r"[a-c]{2}-\d\d", output["text"]), output
        choices = ["yes", "no", "maybe (later)"]
        assert {o["text"] for o in generate(client, **body, **sampled, guided={"choice": choices})["outputs"]} <= set(
            choices)


def test_guided_and_free_rows_of_different_tasks_share_steps(t5_bundle):
    free = [{"task": task, "inputs": f"free {task}", "max_new_tokens": 12} for task in ("alpha", "gamma")]
    guided = [{"task": task, "inputs": f"guided {task}", **LONG, "guided": {"json_schema": SCHEMA}}
              for task in ("beta", "alpha")]

    async def run():
        async with serving(create_app(bundle_settings(t5_bundle, max_batch_wait_ms=200, **LONG))) as http:
            alone = [(await http.post("/generate", json=body)).json() for body in free]
            responses, batched = await send_together(http, [*free, *guided])
            return alone, [r.json() for r in responses], batched

    alone, together, batched = asyncio.run(run())
    assert batched
    assert [r["outputs"] for r in together[:2]] == [r["outputs"] for r in alone]  # free rows unchanged
    for response in together[2:]:
        jsonschema.validate(json.loads(response["outputs"][0]["text"]), SCHEMA)


@pytest.mark.parametrize(("guided", "extra", "field"), [
    ({"json_schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}, {}, "guided.json_schema"),
    ({"regex": "[a-z"}, {}, "guided.regex"),
    ({"regex": "a", "choice": ["b"]}, {}, "guided"),
    ({}, {}, "guided"),
    ({"choice": ["a"]}, {"num_beams": 2}, "guided"),
    ({"choice": ["a"]}, {"ignore_eos": True}, "ignore_eos"),
    ({"choice": ["a"]}, {"min_new_tokens": 2}, "min_new_tokens"),
])
def test_what_cannot_be_guided_is_refused_by_name(client, guided, extra, field):
    response = client.post("/generate", json={"task": "alpha", "inputs": "x", "guided": guided, **extra})
    assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text


@pytest.fixture(scope="module", params=["byt5", "fast"])
def llama_client(request, tmp_path_factory):
    """A causal model whose end of sequence (2) is not the ByT5 tokenizer's (1); or a fast tokenizer (<s> first)."""
    folder = tmp_path_factory.mktemp(f"guided-llama-{request.param}")
    save_bundle(folder, "llama", task_names=["alpha", "beta", "gamma"])
    if request.param == "fast":
        save_bos_byte_tokenizer(folder / "model")
    with TestClient(create_app(bundle_settings(folder, max_new_tokens=64))) as client:
        client.app.state.engine.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
        yield client


def test_openai_response_format_on_completions_and_chat(llama_client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    completion = llama_client.post("/v1/completions", json={
        "model": "beta", "prompt": ["a", "bc"], "max_tokens": 64, "response_format": fmt, "n": 2, "seed": 1}).json()
    chat = llama_client.post("/v1/chat/completions", json={
        "model": "beta", "messages": [{"role": "user", "content": "who?"}], "max_tokens": 64, "temperature": 0,
        "response_format": fmt}).json()
    for text, finish in [*((c["text"], c["finish_reason"]) for c in completion["choices"]),
                         (chat["choices"][0]["message"]["content"], chat["choices"][0]["finish_reason"])]:
        jsonschema.validate(json.loads(text), SCHEMA)
        assert finish == "stop"  # the model's own end of sequence once the object is complete
    anything = llama_client.post("/v1/completions", json={
        "model": "gamma", "prompt": "x", "max_tokens": 64, "response_format": {"type": "json_object"}, "seed": 0,
        "n": 4}).json()
    for choice in anything["choices"]:  # any object; one the limit cut ("length") is the start of one
        assert choice["text"].startswith("{")
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["text"]), dict)
    bad = llama_client.post("/v1/completions", json={"model": "beta", "prompt": "a", "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "response_format.json_schema"
    odd = llama_client.post("/v1/completions", json={"model": "beta", "prompt": "a", "response_format": {"type": "x"}})
    assert odd.status_code == 422 and odd.json()["error"]["field"] == "response_format"
