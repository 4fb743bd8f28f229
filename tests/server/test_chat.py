"""/v1/chat/completions: messages rendered with the tokenizer's chat template, `model` = task; the OpenAI SDK's
chat.completions.create works (plain and streamed); a model without a template gets a clear 400."""

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from server.app import create_app
from tests.factories import save_bundle
from tests.server.conftest import bundle_settings

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def chat_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-llama")
    _, peft_model = save_bundle(folder, "llama", task_names=["alpha", "beta", "gamma"])
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder / "model")
    return folder, peft_model


@pytest.fixture(scope="module")
def chat_client(chat_bundle):
    with TestClient(create_app(bundle_settings(chat_bundle[0]))) as client:
        yield client


def sdk(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def peft_reply(chat_bundle, task_id: int, max_new_tokens: int) -> str:
    folder, peft_model = chat_bundle
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.endswith("user: hello\nassistant: ")
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=torch.tensor([task_id]),
                                  max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_completion_is_the_task_adapters_continuation_of_the_rendered_messages(chat_client, chat_bundle):
    reply = sdk(chat_client).chat.completions.create(model="beta", messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "beta"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == peft_reply(chat_bundle, 1, 8)
    other = sdk(chat_client).chat.completions.create(model="gamma", messages=MESSAGES, max_tokens=8, temperature=0)
    assert other.choices[0].message.content == peft_reply(chat_bundle, 2, 8)
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens == len("system: be brief\nuser: hello\n"
                                                                                   "assistant: ")


def test_chat_streaming_adds_up_to_the_plain_reply(chat_client):
    plain = sdk(chat_client).chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8, temperature=0)
    stream = sdk(chat_client).chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=8, temperature=0,
                                                      stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_chat_errors(chat_client, client):
    with pytest.raises(openai.NotFoundError):
        sdk(chat_client).chat.completions.create(model="nope", messages=MESSAGES, max_tokens=2)
    no_template = client.post("/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES})
    assert no_template.status_code == 400
    error = no_template.json()["error"]
    assert error["field"] == "messages" and "chat template" in error["message"]
    empty = chat_client.post("/v1/chat/completions", json={"model": "alpha", "messages": []})
    assert empty.status_code == 422 and empty.json()["error"]["field"] == "messages"
    too_long = chat_client.post("/v1/chat/completions", json={
        "model": "alpha", "messages": [{"role": "user", "content": "x" * 100}]})
    assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "messages"


def test_chat_equals_the_completions_route_fed_the_rendered_prompt(chat_client, chat_bundle):
    """One decoding path: the chat route's rendered prompt reaches the loop (a second path once decoded from an
    empty prompt), so it answers as /v1/completions does for the same token ids."""
    tokenizer = AutoTokenizer.from_pretrained(chat_bundle[0] / "model")
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for task, options in (("alpha", {}), ("gamma", {"temperature": 1.0, "seed": 3}), ("beta", {"n": 2, "seed": 5,
                                                                                               "temperature": 1.5})):
        body = {"model": task, "max_tokens": 8, "temperature": 0, **options}
        chat = chat_client.post("/v1/chat/completions", json={**body, "messages": MESSAGES}).json()
        plain = chat_client.post("/v1/completions", json={**body, "prompt": ids}).json()
        assert [c["message"]["content"] for c in chat["choices"]] == [c["text"] for c in plain["choices"]]
        assert chat["usage"] == plain["usage"]
