"""/v1/completions and /v1/chat/completions: token-id prompts, n choices per prompt, and the policy for every OpenAI
field (served, accepted without effect, or refused with 422 naming it)."""

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from server.app import create_app
from tests.server.conftest import bundle_settings


@pytest.fixture(scope="module")
def printable(printable_bundle):
    with TestClient(create_app(bundle_settings(printable_bundle))) as client:
        yield client, AutoTokenizer.from_pretrained(printable_bundle / "model")


def post(client, path="/v1/completions", **body):
    return client.post(path, json={"model": "alpha", **body})


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def refused(response, field: str) -> str:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    return error["message"]


def test_token_id_prompts_equal_their_text(printable):
    client, tokenizer = printable
    texts = ["hello", "two words"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    by_text = ok(post(client, prompt=texts, max_tokens=5, temperature=0))
    by_ids = ok(post(client, prompt=ids, max_tokens=5, temperature=0))
    single = ok(post(client, prompt=ids[1], max_tokens=5, temperature=0))
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    assert single["choices"][0]["text"] == by_text["choices"][1]["text"]
    assert by_ids["usage"] == by_text["usage"]


@pytest.mark.parametrize(("prompt", "field"), [
    ([259], "prompt"), ([5, -1], "prompt"), ([[5, 6], [7, 100_000]], "prompt.1"), ([], "prompt"), ([[]], "prompt"),
    ([[5], "text"], "prompt"),
])
def test_bad_token_ids_are_refused_naming_prompt(printable, prompt, field):
    message = refused(post(printable[0], prompt=prompt, max_tokens=2), field)
    assert field in message


def test_n_choices_are_seeded_distinct_indexed_and_counted(printable):
    client, _ = printable
    body = dict(prompt=["ab", "cd"], n=4, max_tokens=8, temperature=2.0, seed=7)
    first, again = ok(post(client, **body)), ok(post(client, **body))
    texts = [c["text"] for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == list(range(8))
    assert texts == [c["text"] for c in again["choices"]]  # reproducible
    assert len(set(texts[:4])) >= 2 and len(set(texts[4:])) >= 2, texts  # different samples of one prompt
    assert first["usage"] == {"prompt_tokens": 3 + 3, "completion_tokens": 8 * 8, "total_tokens": 70}
    # choice i * n + j is row (prompt i, sample j): as the same request with each prompt repeated n times
    rows = ok(post(client, prompt=["ab"] * 4 + ["cd"] * 4, max_tokens=8, temperature=2.0, seed=7))
    assert [c["text"] for c in rows["choices"]] == texts
    greedy = ok(post(client, prompt="ab", n=2, max_tokens=4, temperature=0))
    assert greedy["choices"][0]["text"] == greedy["choices"][1]["text"]


def test_chat_n_choices(printable_bundle):
    tokenizer = AutoTokenizer.from_pretrained(printable_bundle / "model")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with TestClient(create_app(bundle_settings(printable_bundle))) as client:
        client.app.state.engine.tokenizer.chat_template = tokenizer.chat_template
        reply = ok(post(client, "/v1/chat/completions", messages=[{"role": "user", "content": "hello there"}], n=4,
                        max_tokens=8, seed=1, temperature=2.0))
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert len({c["message"]["content"] for c in reply["choices"]}) >= 2
    assert reply["usage"] == {"prompt_tokens": 11, "completion_tokens": 32, "total_tokens": 43}


@pytest.mark.parametrize(("field", "value"), [
    ("logit_bias", {"5": 10}), ("suffix", "end"), ("presence_penalty", 0.5), ("frequency_penalty", -1),
    ("best_of", 17), ("stream_options", {"include_usage": True}), ("temprature", 0.5), ("n", 17), ("logprobs", 21),
])
def test_completion_fields_not_served_are_refused_by_name(printable, field, value):
    refused(post(printable[0], prompt="x", max_tokens=2, **{field: value}), field)


@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("response_format", {"type": "grammar"}),
    ("presence_penalty", 1), ("logit_bias", {"1": -100}), ("audio", {"voice": "x"}), ("top_logprobs", 2),
    ("modalities", ["text", "audio"]), ("reasoning_effort", "low"), ("unknown_field", 1),
])
def test_chat_fields_not_served_are_refused_by_name(printable, field, value):
    refused(post(printable[0], "/v1/chat/completions", messages=[{"role": "user", "content": "x"}], **{field: value}),
            field)


def test_neutral_and_bookkeeping_values_are_accepted_without_effect(printable):
    client, _ = printable
    plain = ok(post(client, prompt="xy", max_tokens=4, temperature=0))["choices"][0]["text"]
    extras = dict(user="u1", metadata={"k": "v"}, store=False, service_tier="auto", logit_bias={},
                  presence_penalty=0, frequency_penalty=0.0, suffix=None, best_of=1, stream_options=None)
    assert ok(post(client, prompt="xy", max_tokens=4, temperature=0, **extras))["choices"][0]["text"] == plain


def test_best_of_returns_the_n_most_likely_of_its_draws(printable):
    client, _ = printable
    body = dict(prompt=["ab", "cd"], max_tokens=6, temperature=2.0, seed=11)
    drawn = ok(post(client, **body, n=4, logprobs=0))["choices"]  # the same rows: index = prompt × 4 + draw
    best = ok(post(client, **body, n=2, best_of=4))
    for prompt in range(2):
        ranked = sorted(drawn[prompt * 4: prompt * 4 + 4], key=lambda c: -sum(c["logprobs"]["token_logprobs"]))
        assert [c["text"] for c in best["choices"][prompt * 2: prompt * 2 + 2]] == [c["text"] for c in ranked[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1, 2, 3] and best["choices"][0]["logprobs"] is None
    assert best["usage"]["completion_tokens"] == 2 * 4 * 6  # every draw is generated


def test_combinations_that_cannot_be_served(printable):
    client, _ = printable
    refused(post(client, prompt="x", n=3, best_of=2), "best_of")
    refused(post(client, prompt="x", n=1, best_of=2, stream=True), "best_of")
    refused(post(client, prompt="x", max_tokens=0), "max_tokens")
    refused(post(client, prompt="x", logprobs=1, stream=True), "logprobs")
    refused(post(client, prompt="x", echo=True, stream=True), "echo")
    refused(post(client, prompt=["x"] * 40, n=2, max_tokens=1), "n")
    chat = dict(messages=[{"role": "user", "content": "x"}])
    refused(post(client, "/v1/chat/completions", **chat, top_logprobs=2), "top_logprobs")


def test_a_mix_written_as_the_model_name_serves_the_mix(printable):
    client, _ = printable
    body = dict(prompt="mixing", max_tokens=6, temperature=0)
    by_name = ok(post(client, **{**body, "model": "mix(alpha=0.7,beta=0.3)"}))
    by_field = ok(post(client, **body, mix={"alpha": 0.7, "beta": 0.3}))
    generated = ok(client.post("/generate", json={"task": {"mix": {"alpha": 0.7, "beta": 0.3}}, "inputs": "mixing",
                                                  "max_new_tokens": 6}))
    assert by_name["model"] == by_field["model"] == generated["task"] == "mix(alpha=0.7,beta=0.3)"
    assert by_name["choices"][0]["text"] == by_field["choices"][0]["text"] == generated["outputs"][0]["text"]
    refused(post(client, **{**body, "model": "mix(alpha=x)"}), "model")
    assert post(client, **{**body, "model": "mix(nope=1)"}).status_code == 422
