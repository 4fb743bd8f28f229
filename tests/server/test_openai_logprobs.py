"""Log-probabilities on the OpenAI routes as vLLM serves them: each value equals log_softmax of PEFT's own forward
(the task's routed adapter), echo's prompt log-probabilities add up to /score's, top lists are the k most likely in
descending order, and a seq2seq prompt (the encoder's input) has none."""

import math

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from server.app import create_app
from tests.factories import save_bundle
from tests.server.conftest import bundle_settings

TASKS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-logprobs")
    _, peft_model = save_bundle(folder, "llama", task_names=TASKS, sharp=3.0)
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    with TestClient(create_app(bundle_settings(folder))) as client:
        yield client, peft_model, tokenizer


def peft_logprobs(peft_model, ids: list[int], task: str, seq2seq_prompt: list[int] | None = None) -> torch.Tensor:
    """log_softmax of PEFT's forward: row t is the distribution of the token after ids[: t + 1] (T, V); seq2seq:
    the decoder reads [start] + ids given the encoder's prompt."""
    task_ids = torch.tensor([TASKS.index(task)])
    with torch.no_grad():
        if seq2seq_prompt is None:
            logits = peft_model(input_ids=torch.tensor([ids]), task_ids=task_ids).logits[0]
        else:
            logits = peft_model(input_ids=torch.tensor([seq2seq_prompt]), task_ids=task_ids,
                                decoder_input_ids=torch.tensor([[0, *ids]])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def byte_ids(tokens: list[str]) -> list[int]:
    """ByT5 token strings -> ids: each is one byte's character (id = byte + 3)."""
    assert all(len(t) == 1 and ord(t) < 256 for t in tokens), tokens
    return [ord(t) + 3 for t in tokens]


def completion(client, **body) -> dict:
    response = client.post("/v1/completions", json={"model": "beta", "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_chosen_token_logprobs_and_top_k_equal_peft(llama):
    client, peft_model, tokenizer = llama
    prompt_ids = tokenizer("hello")["input_ids"]
    choice = completion(client, prompt="hello", max_tokens=6, logprobs=3, ignore_eos=True)
    lp = choice["logprobs"]
    generated = byte_ids(lp["tokens"])
    assert len(generated) == 6 and tokenizer.decode(generated) == choice["text"]
    reference = peft_logprobs(peft_model, prompt_ids + generated, "beta")[len(prompt_ids) - 1: -1]  # (6, V)
    for t, token in enumerate(generated):
        assert lp["token_logprobs"][t] == pytest.approx(reference[t, token].item(), abs=1e-4)
        values, ids = reference[t].topk(3)
        top = lp["top_logprobs"][t]
        assert byte_ids(list(top)) == ids.tolist()  # best first; greedy: the chosen token is the best
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_echo_of_prompt_and_choice_adds_up_to_score(llama):
    client, peft_model, tokenizer = llama
    context, choices = "Q: sky? A:", [" blue", " green"]
    score = client.post("/score", json={"task": "beta", "inputs": context, "choices": choices}).json()
    for choice, scored in zip(choices, score["results"][0]["scores"], strict=True):
        ids = tokenizer(context)["input_ids"] + tokenizer(choice, add_special_tokens=False)["input_ids"]
        echoed = completion(client, prompt=ids, max_tokens=0, echo=True, logprobs=1)
        lp = echoed["logprobs"]
        assert echoed["text"] == context + choice and len(lp["token_logprobs"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert sum(lp["token_logprobs"][-len(choice):]) == pytest.approx(scored["logprob_sum"], abs=1e-4)
        reference = peft_logprobs(peft_model, ids, "beta")  # (T, V)
        expected = [reference[t - 1, ids[t]].item() for t in range(1, len(ids))]
        assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)


def test_echo_with_generation_is_the_prompt_then_the_completion(llama):
    client, _, tokenizer = llama
    plain = completion(client, prompt="abc", max_tokens=4, logprobs=2, ignore_eos=True)
    echoed = completion(client, prompt="abc", max_tokens=4, logprobs=2, ignore_eos=True, echo=True)
    n_prompt = len(tokenizer("abc")["input_ids"])  # "abc</s>"
    assert echoed["text"] == "abc" + plain["text"]
    lp = echoed["logprobs"]
    assert lp["tokens"][:n_prompt] == ["a", "b", "c", "</s>"]
    assert lp["token_logprobs"][n_prompt:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)
    assert lp["text_offset"][:n_prompt + 1] == [0, 1, 2, 3, 3]  # </s> adds no text
    without = completion(client, prompt="abc", max_tokens=2, echo=True)
    assert without["text"].startswith("abc") and without["logprobs"] is None


def test_lm_eval_loglikelihood_request_shape(llama):
    """What lm-eval's local-completions sends: max_tokens 1, echo, logprobs 1 -> prompt entries + one generated."""
    client, _, tokenizer = llama
    ids = [[*tokenizer("ab", add_special_tokens=False)["input_ids"]], [*tokenizer("xyz")["input_ids"]]]
    response = client.post("/v1/completions", json={"model": "beta", "prompt": ids, "max_tokens": 1, "echo": True,
                                                    "logprobs": 1, "temperature": 0, "seed": 1234})
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for choice, prompt in zip(choices, ids, strict=True):
        assert len(choice["logprobs"]["token_logprobs"]) == len(prompt) + 1
        for value, top in zip(choice["logprobs"]["token_logprobs"][1:], choice["logprobs"]["top_logprobs"][1:],
                              strict=True):
            assert value <= max(top.values()) + 1e-6 and len(top) in (1, 2)


def test_top_lists_are_sorted_hold_k_and_the_chosen_token(llama):
    client, _, _ = llama
    sampled = completion(client, prompt="zz", max_tokens=8, logprobs=5, temperature=1.5, seed=3, ignore_eos=True)
    lp = sampled["logprobs"]
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        values = list(top.values())
        assert values[:5] == sorted(values[:5], reverse=True) and len(top) in (5, 6)
        assert top[token] == pytest.approx(value)
        if len(top) == 6:  # sampled outside the top 5: the chosen token comes last, below all of them
            assert list(top)[-1] == token and value <= values[4]
        assert all(v <= 0 for v in top.values()) and math.isfinite(value)
    zero = completion(client, prompt="zz", max_tokens=3, logprobs=0, ignore_eos=True)
    assert all(list(top) == [token] for token, top in zip(zero["logprobs"]["tokens"],
                                                          zero["logprobs"]["top_logprobs"], strict=True))


def test_chat_logprobs_equal_the_completion_of_the_rendered_prompt(llama):
    client, _, tokenizer = llama
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    client.app.state.engine.tokenizer.chat_template = tokenizer.chat_template
    try:
        reply = client.post("/v1/chat/completions", json={
            "model": "beta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "logprobs": True, "top_logprobs": 2, "ignore_eos": True}).json()["choices"][0]
    finally:
        client.app.state.engine.tokenizer.chat_template = None
    ids = tokenizer("hi\n", add_special_tokens=False)["input_ids"]
    plain = completion(client, prompt=ids, max_tokens=5, logprobs=2, ignore_eos=True)
    content = reply["logprobs"]["content"]
    assert tokenizer.decode(byte_ids([c["token"] for c in content])) == reply["message"]["content"] == plain["text"]
    assert [c["logprob"] for c in content] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)
    for entry in content:
        assert len(entry["top_logprobs"]) == 2 and entry["bytes"] == [ord(entry["token"])]
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]


def test_seq2seq_echo_has_null_prompt_logprobs_and_peft_completion_logprobs(client, t5_bundle):
    """T5: the prompt is the encoder's input, so its echoed tokens carry no log-probability."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    tokenizer = AutoTokenizer.from_pretrained(t5_bundle / "model")
    peft_model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(t5_bundle / "model"),
                                           t5_bundle / "inventory").eval()
    choice = completion(client, prompt="hello", max_tokens=4, logprobs=1, echo=True, ignore_eos=True)
    prompt_ids = tokenizer("hello")["input_ids"]
    lp = choice["logprobs"]
    assert lp["tokens"][: len(prompt_ids)] == list("hello") + ["</s>"]
    assert lp["token_logprobs"][: len(prompt_ids)] == [None] * len(prompt_ids)
    generated = byte_ids(lp["tokens"][len(prompt_ids):])
    reference = peft_logprobs(peft_model, generated, "beta", seq2seq_prompt=prompt_ids)
    expected = [reference[t, token].item() for t, token in enumerate(generated)]
    assert lp["token_logprobs"][len(prompt_ids):] == pytest.approx(expected, abs=1e-4)
    score_only = client.post("/v1/completions", json={"model": "beta", "prompt": "hello", "max_tokens": 0,
                                                      "echo": True, "logprobs": 1})
    assert score_only.status_code == 422 and score_only.json()["error"]["field"] == "echo"


def test_generate_logprobs_equal_the_completion_logprobs(llama):
    client, _, _ = llama
    body = {"task": "beta", "inputs": ["hello", "other"], "max_new_tokens": 5, "logprobs": 2, "ignore_eos": True}
    outputs = client.post("/generate", json=body).json()["outputs"]
    for text, output in zip(body["inputs"], outputs, strict=True):
        reference = completion(client, prompt=text, max_tokens=5, logprobs=2, ignore_eos=True)["logprobs"]
        assert [e["logprob"] for e in output["logprobs"]] == pytest.approx(reference["token_logprobs"], abs=1e-5)
        assert [e["token"] for e in output["logprobs"]] == reference["tokens"]
        assert byte_ids(reference["tokens"]) == [e["id"] for e in output["logprobs"]]
        for entry, top in zip(output["logprobs"], reference["top_logprobs"], strict=True):
            assert [t["id"] for t in entry["top"]] == byte_ids(list(top)[:2])  # greedy: the chosen token is the best
            assert [t["logprob"] for t in entry["top"]] == pytest.approx(list(top.values())[:2], abs=1e-5)
    for extra in ({"num_beams": 2}, {"stream": True}):
        refused = client.post("/generate", json={**body, **extra})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "logprobs"


def test_the_openai_sdk_reads_logprobs_echo_and_structured_output(llama):
    import openai

    client, _, _ = llama
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    plain = completion(client, prompt="sdk", max_tokens=3, logprobs=2, echo=True, ignore_eos=True)
    parsed = sdk.completions.create(model="beta", prompt="sdk", max_tokens=3, logprobs=2, echo=True, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert parsed.choices[0].logprobs.token_logprobs == plain["logprobs"]["token_logprobs"]
    assert parsed.choices[0].logprobs.top_logprobs[1] == plain["logprobs"]["top_logprobs"][1]
    client.app.state.engine.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        chat = sdk.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=16,
                                           temperature=0, logprobs=True, top_logprobs=2,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "c", "schema": {"enum": ["red", "green"]}}})
    finally:
        client.app.state.engine.tokenizer.chat_template = None
    assert chat.choices[0].message.content in ('"red"', '"green"')
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 for c in content)


def test_echo_of_more_prompts_than_a_chunk_equals_each_alone(llama, monkeypatch):
    client, _, tokenizer = llama
    monkeypatch.setattr(client.app.state.engine.loop.policy, "max_rows", 2)  # echo forwards: chunks of 2 prompts
    prompts = [tokenizer(text)["input_ids"] for text in ("a", "bb", "ccc", "dddd", "eeeee")]
    together = client.post("/v1/completions", json={"model": "gamma", "prompt": prompts, "max_tokens": 0,
                                                    "echo": True, "logprobs": 1}).json()["choices"]
    for prompt, choice in zip(prompts, together, strict=True):
        alone = completion(client, model="gamma", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
        assert choice["logprobs"]["tokens"] == alone["logprobs"]["tokens"]
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(alone["logprobs"]["token_logprobs"][1:],
                                                                         abs=1e-4)
