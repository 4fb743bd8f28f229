"""The client against the real app in-process (tiny T5 bundle, TestClient's transport, lifespan running).

Starlette's TestClient is built on httpx2, whose transports httpx cannot use; Bridge forwards each
httpx request through the TestClient (same portal, so the app's lifespan state is shared) and converts back.
"""

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from client import Client, Conflict, Forbidden, Unauthorized, UnknownTask, ValidationError
from client.cli import main
from server.app import create_app
from tests.factories import save_bundle
from tests.server.conftest import bundle_settings

KEY = "test-key"
EXAMPLES = [(f"question {i}", "yes" if i % 2 else "no") for i in range(6)]


class Bridge(httpx.BaseTransport):
    def __init__(self, test_client: TestClient):
        self.test_client = test_client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answer = self.test_client.request(request.method, str(request.url), content=request.read(),
                                          headers=list(request.headers.multi_items()))
        headers = [(k, v) for k, v in answer.headers.multi_items() if k.lower() != "content-encoding"]
        return httpx.Response(answer.status_code, headers=headers, content=answer.content)


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    folder = tmp_path_factory.mktemp("client-bundle")
    save_bundle(folder, "t5", task_names=["alpha", "beta", "gamma"])
    with TestClient(create_app(bundle_settings(folder, api_key=KEY))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def mhr(app_client):
    with Client("http://testserver", api_key=KEY, transport=Bridge(app_client)) as mhr:
        yield mhr


@pytest.fixture(scope="module")
def adapted(mhr):
    job = mhr.adapt("delta", EXAMPLES, steps=3, batch_size=2)
    seen = []
    return job, mhr.wait(job.id, poll_interval=0.05, timeout=120, on_progress=seen.append), seen


def test_health_ready_and_tasks(mhr):
    assert mhr.health() == {"status": "ok"}
    assert mhr.ready().ready
    names = {task.name: task for task in mhr.tasks()}
    assert {"alpha", "beta", "gamma"} <= set(names) and names["beta"].kind == "pretrained"
    assert mhr.task("gamma") == names["gamma"]


def test_generate_stream_and_score(mhr):
    response = mhr.generate("alpha", ["hello", "world"], max_new_tokens=4)
    assert response.task == "alpha" and len(response.outputs) == 2
    assert all(o.completion_tokens <= 4 for o in response.outputs)
    events = list(mhr.stream("alpha", "hello", max_new_tokens=4))
    assert events[-1].done and "".join(e.text for e in events[:-1]) == events[-1].response.outputs[0].text
    assert events[-1].response.outputs[0].text == mhr.generate("alpha", "hello", max_new_tokens=4).texts[0]
    scored = mhr.score("beta", "is it?", ["yes", "no"])
    assert scored.results[0].best in ("yes", "no") and len(scored.results[0].scores) == 2


def test_generate_with_logprobs_equals_the_servers_answer(mhr, app_client):
    response = mhr.generate("beta", ["hello", "world"], max_new_tokens=4, logprobs=3, ignore_eos=True)
    raw = app_client.post("/generate", json={"task": "beta", "inputs": ["hello", "world"], "max_new_tokens": 4,
                                             "logprobs": 3, "ignore_eos": True}).json()
    assert [o.model_dump() for o in response.outputs] == raw["outputs"]
    for output in response.outputs:
        assert len(output.logprobs) == 4 and all(len(entry.top) == 3 for entry in output.logprobs)
        assert all(entry.top[0].logprob >= entry.top[2].logprob for entry in output.logprobs)
    assert mhr.generate("beta", "hello", max_new_tokens=2).outputs[0].logprobs is None
    with pytest.raises(ValidationError) as refused:
        mhr.generate("beta", "hello", max_new_tokens=2, logprobs=1, num_beams=2)
    assert refused.value.field == "logprobs"


def test_guided_generation_and_stream_follow_the_grammar(mhr):
    choices = ["red", "green", "blue"]
    response = mhr.generate("alpha", ["one", "two", "three"], guided={"choice": choices})
    assert set(response.texts) <= set(choices) and all(o.finish_reason == "stop" for o in response.outputs)
    events = list(mhr.stream("gamma", "x", guided={"regex": "[a-f]{3}"}, max_new_tokens=8))
    assert len(events[-1].response.texts[0]) == 3 and set(events[-1].response.texts[0]) <= set("abcdef")
    with pytest.raises(ValidationError) as refused:
        mhr.generate("alpha", "x", guided={"regex": "("})
    assert refused.value.field == "guided.regex"


def test_a_composed_task_serves_as_its_mix_does(mhr):
    mix = {"alpha": 0.7, "beta": 0.3}
    adhoc = mhr.generate(mix, ["hello", "world"], max_new_tokens=4)
    assert (adhoc.task, adhoc.version) == ("mix(alpha=0.7,beta=0.3)", None)
    info = mhr.compose("blend", {"alpha": 7, "beta": 3})
    assert (info.kind, info.version, info.mix) == ("composed", 1, mix) and mhr.task("blend") == info
    composed = mhr.generate("blend", ["hello", "world"], max_new_tokens=4)
    assert (composed.task, composed.version) == ("blend", 1) and composed.texts == adhoc.texts
    scores = [[s.logprob_sum for s in mhr.score(task, "is it?", ["yes", "no"]).results[0].scores]
              for task in (mix, "blend", "alpha")]
    assert scores[1] == pytest.approx(scores[0], abs=1e-5) and scores[2] != pytest.approx(scores[0], abs=1e-5)
    events = list(mhr.stream(mix, "hello", max_new_tokens=4))
    assert events[-1].response.version is None and events[-1].response.texts == [adhoc.texts[0]]
    with pytest.raises(Conflict):
        mhr.compose("blend", mix)  # exists already: overwrite=True replaces it
    with pytest.raises(ValidationError) as caught:
        mhr.generate({"alpha": 1, "nope": 1}, "hello")
    assert caught.value.field == "task.mix.nope"
    assert mhr.delete_task("blend").kind == "composed"


def test_errors_name_what_is_wrong(mhr, app_client):
    with pytest.raises(UnknownTask) as caught:
        mhr.generate("nope", "hello")
    assert caught.value.field == "task"
    with pytest.raises(ValidationError) as caught:
        mhr.generate("alpha", "hello", max_new_tokens=-1)
    assert caught.value.field == "max_new_tokens" and caught.value.status == 422
    with pytest.raises(Conflict):
        mhr.delete_task("alpha")
    with Client("http://testserver", transport=Bridge(app_client)) as anonymous, pytest.raises(Unauthorized):
        anonymous.adapt("x", EXAMPLES)
    with Client("http://testserver", api_key="wrong", transport=Bridge(app_client)) as wrong, \
            pytest.raises(Forbidden):
        wrong.delete_task("alpha")


def test_adapt_and_wait(mhr, adapted):
    queued, job, seen = adapted
    assert queued.state in ("queued", "running") and queued.task == "delta"
    assert job.state == "succeeded" and job.step == job.steps == 3 and job.version == 1, job
    assert seen[-1] == job and job.id in {j.id for j in mhr.jobs()}
    assert mhr.task("delta").kind == "adapted"
    assert mhr.generate("delta", "question 1", max_new_tokens=2).task == "delta"


def test_export_then_delete(mhr, adapted, tmp_path):
    folder = mhr.export("delta", tmp_path)
    assert folder == (tmp_path / "delta").resolve()
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (folder / "adapter_model.safetensors").stat().st_size > 0
    assert mhr.delete_task("delta").name == "delta"
    with pytest.raises(UnknownTask):
        mhr.task("delta")


def test_cli_against_the_app(app_client, tmp_path, capsys):
    examples = tmp_path / "examples.jsonl"
    examples.write_text("\n".join(json.dumps({"input": i, "target": t}) for i, t in EXAMPLES))
    common = ["--url", "http://testserver", "--api-key", KEY]
    transport = Bridge(app_client)
    status = main([*common, "adapt", "epsilon", "--examples", str(examples), "--steps", "2", "--poll-interval",
                   "0.05"], transport=transport)
    out, err = capsys.readouterr()
    assert status == 0 and json.loads(out)["state"] == "succeeded"
    assert err.startswith("\repsilon [") and "2/2 succeeded" in err and err.endswith("\n")
    assert main([*common, "generate", "epsilon", "hello", "--max-new-tokens", "2"], transport=transport) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main([*common, "generate", "nope", "hello"], transport=transport) == 2
    assert capsys.readouterr().err == "error: unknown task 'nope'; GET /tasks lists the tasks\n"
    assert main([*common, "delete", "epsilon"], transport=transport) == 0


def test_cli_composes_mixes_and_retrieves_against_the_app(app_client, tmp_path, capsys):
    examples = tmp_path / "examples.jsonl"
    examples.write_text("\n".join(json.dumps({"input": i, "target": t}) for i, t in EXAMPLES))
    common = ["--url", "http://testserver", "--api-key", KEY]
    transport = Bridge(app_client)
    assert main([*common, "compose", "cli-blend", "alpha=1", "gamma=3"], transport=transport) == 0
    assert capsys.readouterr().out == "composed cli-blend (version 1): alpha=0.25,gamma=0.75\n"
    assert main([*common, "generate", "cli-blend", "hello", "--max-new-tokens", "3"], transport=transport) == 0
    named = capsys.readouterr().out
    assert main([*common, "generate", "--mix", "gamma=0.75,alpha=0.25", "hello", "--max-new-tokens", "3"],
                transport=transport) == 0
    assert capsys.readouterr().out == named
    status = main([*common, "adapt", "found", "--examples", str(examples), "--method", "retrieve", "--k", "2"],
                  transport=transport)
    out, err = capsys.readouterr()
    job = json.loads(out)
    assert status == 0 and job["state"] == "succeeded" and len(job["result"]["mix"]) <= 2
    assert err.endswith("\n") and err.splitlines()[-1].startswith("found: retrieved mix ")
    assert main([*common, "tasks", "found"], transport=transport) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1:4] == ["composed", "1", "retrieve"]
    for name in ("cli-blend", "found"):
        assert main([*common, "delete", name], transport=transport) == 0
