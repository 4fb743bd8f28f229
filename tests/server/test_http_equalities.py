"""Equalities over HTTP: T5 v1.1 (gated feed-forward) against PEFT's own Poly forward with merging on and
off, stop strings while streaming, and rows with different max_new_tokens in one batch."""

import asyncio
import json

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import ByT5Tokenizer

from server.app import create_app
from tests.factories import save_bundle
from tests.server.conftest import bundle_settings, send_together, serving, sse_events, texts

TEXTS = ["hello there", "abc", "a longer input text", "xyz!"]


@pytest.fixture(scope="module")
def gated_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5-gated")
    _, peft_model = save_bundle(folder, "t5-gated", task_names=["alpha", "beta", "gamma"])
    return folder, peft_model


def peft_generate(peft_model, texts_: list[str], task_ids: list[int], max_new_tokens: int = 8) -> list[str]:
    tokenizer = ByT5Tokenizer(extra_ids=0)
    batch = tokenizer(texts_, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = peft_model.generate(**batch, task_ids=torch.tensor(task_ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]


@pytest.mark.parametrize("merge", [True, False], ids=["merge", "no-merge"])
def test_gated_t5_v1_1_over_http_equals_peft(gated_bundle, merge):
    folder, peft_model = gated_bundle
    targets = set(json.loads((folder / "inventory" / "adapter_config.json").read_text())["target_modules"])
    assert {"wi_0", "wi_1"} <= targets
    app = create_app(bundle_settings(folder, merge_single_task=merge, max_batch_wait_ms=50))
    tasks = ["alpha", "beta", "gamma", "beta"]

    async def scenario():
        async with serving(app) as http:
            bodies = [{"task": t, "inputs": x, "max_new_tokens": 8} for t, x in zip(tasks, TEXTS, strict=True)]
            responses, batched = await send_together(http, bodies)
            per_task = {t: texts(await http.post("/generate", json={"task": t, "inputs": TEXTS, "max_new_tokens": 8}))
                        for t in ("alpha", "beta", "gamma")}
            return [texts(r)[0] for r in responses], batched, per_task

    mixed, batched, per_task = asyncio.run(scenario())
    assert batched, "the requests were not batched together"
    assert mixed == peft_generate(peft_model, TEXTS, [0, 1, 2, 1])
    assert len(set(mixed)) > 1
    for row, task in enumerate(("alpha", "beta", "gamma")):
        assert per_task[task] == peft_generate(peft_model, TEXTS, [row] * len(TEXTS)), task


def read_stream(client, path: str, body: dict) -> tuple[list[str], dict | None, list[str]]:
    """(text per row put together from the pieces, the final event's data or None, every piece in order)."""
    pieces, done, rows = [], None, [""] * 4
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        for event, data in sse_events(response.iter_lines()):
            if data == "[DONE]":
                continue
            assert event != "error" and "error" not in data, data
            if event == "done":
                done = data
            elif "choices" in data:  # OpenAI chunks
                for choice in data["choices"]:
                    rows[choice["index"]] += choice["text"]
                    pieces.append(choice["text"])
            else:
                rows[data["index"]] += data["text"]
                pieces.append(data["text"])
    return rows, done, pieces


def cut(text: str, stops: list[str]) -> str:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(found)] if found else text


def test_stop_strings_while_streaming(printable_bundle):
    """Sampled (seeded) text of the printable bundle: varied characters, never an early end of sequence."""
    def new_pair(text: str) -> str | None:  # two characters that first occur inside the text, not at its start
        return next((text[p: p + 2] for p in range(1, len(text) - 2) if text.find(text[p: p + 2]) == p), None)

    with TestClient(create_app(bundle_settings(printable_bundle))) as client:
        for seed in range(10):  # a seed whose rows each get a stop string (two tokens) with a non-trivial cut
            body = {"task": "alpha", "inputs": ["stop here", "and here"], "max_new_tokens": 16, "do_sample": True,
                    "temperature": 2.0, "seed": seed}
            full = texts(client.post("/generate", json=body))
            stops = [new_pair(text) for text in full]
            expected = [cut(text, stops) for text in full] if None not in stops else []
            if expected and all(0 < len(e) < len(t) for e, t in zip(expected, full, strict=True)):
                break
        else:
            pytest.fail("no seed gave rows with a non-trivial stop string")

        plain = client.post("/generate", json={**body, "stop": stops}).json()
        assert [o["text"] for o in plain["outputs"]] == expected
        assert all(o["finish_reason"] == "stop" for o in plain["outputs"])

        rows, done, pieces = read_stream(client, "/generate", {**body, "stop": stops, "stream": True})
        assert rows[:2] == expected  # nothing past a stop string was ever sent
        assert done is not None and done["outputs"] == plain["outputs"]

        completion = {"model": "alpha", "prompt": body["inputs"], "max_tokens": 16, "temperature": 2.0, "seed": seed,
                      "stop": stops}
        answer = client.post("/v1/completions", json=completion).json()
        assert [c["text"] for c in answer["choices"]] == expected
        rows, _, _ = read_stream(client, "/v1/completions", {**completion, "stream": True})
        assert rows[:2] == expected


def test_rows_with_different_max_new_tokens_in_one_batch_equal_each_alone(printable_bundle):
    """No early end of sequence here: every row generates exactly its own max_new_tokens."""
    app = create_app(bundle_settings(printable_bundle, max_batch_wait_ms=50))
    limits = [1, 3, 16, 6, 2, 16, 9]
    tasks = ["alpha", "beta", "alpha", "gamma", "__mu__", "beta", "alpha"]
    bodies = [{"task": t, "inputs": "the same input", "max_new_tokens": n} for t, n in zip(tasks, limits, strict=True)]
    bodies.append({"task": "gamma", "inputs": ["two rows", "in one request"], "max_new_tokens": 5})

    async def scenario():
        async with serving(app) as http:
            alone = [(await http.post("/generate", json=body)).json() for body in bodies]
            responses, batched = await send_together(http, bodies)
            return alone, [r.json() for r in responses], batched

    alone, together, batched = asyncio.run(scenario())
    assert batched, "the requests were not batched together"
    assert [r["outputs"] for r in together] == [r["outputs"] for r in alone]
    for body, response in zip(bodies, together, strict=True):
        for output in response["outputs"]:
            assert output["completion_tokens"] == body["max_new_tokens"] and output["finish_reason"] == "length"
    by_task = {}
    for body, response in zip(bodies[:-1], together[:-1], strict=True):
        by_task.setdefault(body["task"], []).append(response["outputs"][0]["text"])
    for task, outs in by_task.items():  # greedy: a shorter limit gives a prefix of a longer one
        outs.sort(key=len)
        assert all(longer.startswith(shorter) for shorter, longer in zip(outs, outs[1:], strict=False)), (
            task, outs)
