"""The `mhr` command line through client.cli.main(argv, transport=MockTransport)."""

import json

import httpx
import pytest

import client._client as client_module
from client.cli import main, progress_line
from client.models import AdaptJob
from tests.client.fakes import COMPOSED, GENERATED, MIXED, RETRIEVED, SSE, TASKS, error, job_body, make_zip


class FakeServer:
    """Routes by (method, path); a list answer is consumed one item per request."""

    def __init__(self, routes):
        self.routes, self.requests = routes, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.routes.get((request.method, request.url.path))
        if answer is None:
            return error(404, "http_error", "Not Found")
        if isinstance(answer, list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        if isinstance(answer, Exception):
            raise answer
        return answer if isinstance(answer, httpx.Response) else httpx.Response(200, json=answer)


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch):
    monkeypatch.setattr(client_module, "_sleep", lambda seconds: None)
    monkeypatch.delenv("MHR_URL", raising=False)
    monkeypatch.delenv("MHR_API_KEY", raising=False)


def run(routes, *argv):
    server = FakeServer(routes)
    return main(list(argv), transport=httpx.MockTransport(server)), server


def test_generate_prints_texts_or_json_and_reads_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("MHR_URL", "http://env.test:9000")
    monkeypatch.setenv("MHR_API_KEY", "from-env")
    status, server = run({("POST", "/generate"): GENERATED}, "generate", "alpha", "hello", "--max-new-tokens", "3")
    assert status == 0 and capsys.readouterr().out == "hi\n"
    request = server.requests[0]
    assert str(request.url) == "http://env.test:9000/generate" and request.headers["authorization"] == "Bearer from-env"
    assert json.loads(request.content) == {"task": "alpha", "inputs": "hello", "max_new_tokens": 3}
    status, server = run({("POST", "/generate"): GENERATED}, "generate", "--url", "http://flag.test", "--api-key",
                         "k2", "alpha", "a", "b", "--json")
    assert status == 0 and json.loads(capsys.readouterr().out)["outputs"][0]["text"] == "hi"
    assert server.requests[0].url.host == "flag.test" and server.requests[0].headers["authorization"] == "Bearer k2"
    assert json.loads(server.requests[0].content)["inputs"] == ["a", "b"]


def test_generate_with_logprobs_prints_each_token(capsys):
    with_logprobs = {"task": "alpha", "version": 1, "usage": {"prompt_tokens": 2, "completion_tokens": 2}, "outputs": [
        {"text": "hi", "prompt_tokens": 2, "completion_tokens": 2, "finish_reason": "length", "logprobs": [
            {"token": "h", "id": 107, "logprob": -0.5, "top": [{"token": "h", "id": 107, "logprob": -0.5}]},
            {"token": "i", "id": 108, "logprob": -1.25, "top": [{"token": "i", "id": 108, "logprob": -1.25}]}]}]}
    status, server = run({("POST", "/generate"): with_logprobs}, "generate", "alpha", "x", "--logprobs", "1")
    assert status == 0 and capsys.readouterr().out == "hi\n  'h'\t-0.5000\t'h'=-0.5000\n  'i'\t-1.2500\t'i'=-1.2500\n"
    assert json.loads(server.requests[0].content)["logprobs"] == 1


def test_generate_stream_prints_pieces(capsys):
    stream = httpx.Response(200, content=SSE.encode(), headers={"content-type": "text/event-stream"})
    status, _ = run({("POST", "/generate"): stream}, "generate", "alpha", "hello", "--stream")
    assert status == 0 and capsys.readouterr().out == "hi\n"


def test_score_tasks_jobs_cancel_delete(capsys):
    scored = {"task": "alpha", "version": 1, "results": [{"best": "no", "best_index": 1, "best_by_mean_index": 1,
              "scores": [{"choice": "yes", "logprob_sum": -3.0, "logprob_mean": -1.5, "tokens": 2},
                         {"choice": "no", "logprob_sum": -1.0, "logprob_mean": -0.5, "tokens": 2}]}]}
    routes = {("POST", "/score"): scored, ("GET", "/tasks"): TASKS, ("GET", "/adapt"): {"jobs": [job_body()]},
              ("DELETE", "/adapt/j1"): job_body("cancelled"), ("DELETE", "/tasks/new"): {**TASKS["tasks"][0],
                                                                                         "name": "new"}}
    status, server = run(routes, "score", "alpha", "is it?", "--choice", "yes", "--choice", "no")
    assert status == 0 and capsys.readouterr().out == "no\tyes=-3.000  no=-1.000\n"
    assert json.loads(server.requests[0].content)["choices"] == ["yes", "no"]
    assert run(routes, "tasks")[0] == 0
    assert capsys.readouterr().out.split("\n")[1].split() == ["alpha", "pretrained", "1", "mhr"]
    assert run(routes, "jobs")[0] == 0 and "j1" in capsys.readouterr().out
    assert run(routes, "cancel", "j1")[0] == 0 and json.loads(capsys.readouterr().out)["state"] == "cancelled"
    assert run(routes, "delete", "new")[0] == 0 and capsys.readouterr().out == "deleted new (version 1)\n"


def test_generate_and_score_take_a_mix_instead_of_the_task(capsys):
    scored = {"task": "mix(alpha=0.75,beta=0.25)", "version": None, "results": [
        {"best": "yes", "best_index": 0, "best_by_mean_index": 0,
         "scores": [{"choice": "yes", "logprob_sum": -1.0, "logprob_mean": -0.5, "tokens": 2}]}]}
    routes = {("POST", "/generate"): MIXED, ("POST", "/score"): scored}
    status, server = run(routes, "generate", "--mix", "alpha=0.75,beta=0.25", "hello", "world", "--min-new-tokens",
                         "2", "--ignore-eos")
    assert status == 0 and capsys.readouterr().out == "hi\n"
    assert json.loads(server.requests[0].content) == {"task": {"mix": {"alpha": 0.75, "beta": 0.25}},
                                                      "inputs": ["hello", "world"], "min_new_tokens": 2,
                                                      "ignore_eos": True}
    status, server = run(routes, "score", "is it?", "--mix", "alpha=3", "--choice", "yes", "--json")
    assert status == 0 and json.loads(capsys.readouterr().out)["version"] is None
    assert json.loads(server.requests[0].content) == {"task": {"mix": {"alpha": 3.0}}, "inputs": "is it?",
                                                      "choices": ["yes"]}


def test_generate_with_a_json_schema_file_or_a_regex_sends_guided(capsys, tmp_path):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    status, server = run({("POST", "/generate"): GENERATED}, "generate", "alpha", "x", "--json-schema",
                         str(tmp_path / "schema.json"))
    assert status == 0 and json.loads(server.requests[0].content)["guided"] == {"json_schema": schema}
    status, server = run({("POST", "/generate"): GENERATED}, "generate", "alpha", "x", "--regex", "[0-9]+")
    assert status == 0 and json.loads(server.requests[0].content)["guided"] == {"regex": "[0-9]+"}
    capsys.readouterr()
    status, server = run({("POST", "/generate"): GENERATED}, "generate", "alpha", "x", "--json-schema",
                         str(tmp_path / "missing.json"))
    assert status == 2 and server.requests == [] and "--json-schema" in capsys.readouterr().err


def test_generate_without_a_text_is_a_usage_error(capsys):
    status, server = run({("POST", "/generate"): GENERATED}, "generate", "alpha")
    assert status == 2 and server.requests == []
    assert capsys.readouterr().err == ("error: generate needs a TASK and at least one TEXT, or --mix TASK=WEIGHT,... "
                                       "and TEXT\n")


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "--mix", "alpha", "x"], "argument --mix: expected TASK=WEIGHT, got 'alpha'"),
    (["generate", "--mix", "alpha=0.5,", "x"], "argument --mix: expected TASK=WEIGHT, got ''"),
    (["score", "--mix", "=1", "x", "--choice", "y"], "argument --mix: expected TASK=WEIGHT, got '=1'"),
    (["generate", "--mix", "alpha=lots", "x"], "argument --mix: the weight in 'alpha=lots' is not a number"),
    (["generate", "--mix", "alpha=nan", "x"], "argument --mix: the weight in 'alpha=nan' is not a finite number"),
    (["compose", "blend", "alpha=1", "beta"], "argument TASK=WEIGHT: expected TASK=WEIGHT, got 'beta'"),
    (["compose", "blend", "alpha=1", "alpha=2"], "argument TASK=WEIGHT: task 'alpha' is given twice"),
])
def test_bad_task_weight_syntax_is_a_usage_error_naming_the_argument(capsys, argv, message):
    with pytest.raises(SystemExit) as caught:
        run({}, *argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.startswith("usage: mhr ") and err.endswith(f": error: {message}\n")


def test_compose_then_tasks_shows_the_recipe(capsys):
    listed = {"tasks": [*TASKS["tasks"], COMPOSED]}
    routes = {("POST", "/tasks"): httpx.Response(201, json=COMPOSED), ("GET", "/tasks"): listed,
              ("GET", "/tasks/blend"): COMPOSED}
    status, server = run(routes, "compose", "blend", "alpha=3", "beta=1", "--overwrite")
    assert status == 0 and capsys.readouterr().out == "composed blend (version 2): alpha=0.75,beta=0.25\n"
    assert json.loads(server.requests[0].content) == {"name": "blend", "mix": {"alpha": 3.0, "beta": 1.0},
                                                      "overwrite": True}
    assert run(routes, "compose", "blend", "alpha=3,beta=1", "--json")[0] == 0
    assert json.loads(capsys.readouterr().out)["mix"] == {"alpha": 0.75, "beta": 0.25}
    assert run(routes, "tasks")[0] == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "VERSION", "METHOD", "MIX"]
    assert lines[1].split() == ["alpha", "pretrained", "1", "mhr"]
    assert lines[2].split() == ["blend", "composed", "2", "composition", "alpha=0.75,beta=0.25"]
    assert run(routes, "tasks", "blend")[0] == 0 and capsys.readouterr().out.split("\n")[1].endswith("beta=0.25")


@pytest.fixture
def examples(tmp_path):
    path = tmp_path / "examples.jsonl"
    path.write_text('{"input": "a", "target": "b", "id": 1}\n\n{"input": "c", "target": "d"}\n')
    return path


def test_adapt_shows_a_progress_bar_then_prints_the_job(capsys, examples):
    polls = [job_body("queued", step=0, loss=None, eta_s=None), job_body(step=4, eta_s=75.0),
             job_body("succeeded", step=10, loss=0.25, version=1, elapsed_s=9.0)]
    routes = {("POST", "/adapt"): httpx.Response(202, json=job_body("queued", step=0)),
              ("GET", "/adapt/j1"): [httpx.Response(200, json=p) for p in polls]}
    status, server = run(routes, "adapt", "new", "--examples", str(examples), "--steps", "10", "--lr", "0.5",
                         "--poll-interval", "0")
    out, err = capsys.readouterr()
    assert status == 0 and json.loads(out)["state"] == "succeeded"
    assert json.loads(server.requests[0].content) == {
        "task": "new", "method": "mhr-z", "steps": 10, "learning_rate": 0.5,
        "examples": [{"input": "a", "target": "b"}, {"input": "c", "target": "d"}]}
    frames = err.split("\r")[1:]
    assert len(frames) == 3 and err.endswith("\n")
    assert frames[0].startswith("new [------------------------] 0/10 queued")
    assert "4/10 running loss 1.5000 1m15s left" in frames[1]
    assert "[########################] 10/10 succeeded loss 0.2500 in 9s" in frames[2]


def test_adapt_by_retrieval_prints_the_retrieved_mix_at_the_end(capsys, examples):
    done = job_body("succeeded", step=1, steps=200, method="retrieve", loss=0.5, version=1, elapsed_s=0.4,
                    result=RETRIEVED)
    routes = {("POST", "/adapt"): httpx.Response(202, json=job_body("queued", step=0, method="retrieve")),
              ("GET", "/adapt/j1"): done}
    status, server = run(routes, "adapt", "new", "--examples", str(examples), "--method", "retrieve", "--k", "2",
                         "--poll-interval", "0")
    out, err = capsys.readouterr()
    assert status == 0 and json.loads(out)["result"] == RETRIEVED
    assert json.loads(server.requests[0].content) == {
        "task": "new", "method": "retrieve", "k": 2,
        "examples": [{"input": "a", "target": "b"}, {"input": "c", "target": "d"}]}
    assert err == "\rnew [retrieve] succeeded loss 0.5000 in 0s\nnew: retrieved mix alpha=0.6,beta=0.4\n"
    assert run(routes, "adapt", "new", "--examples", str(examples), "--method", "retrieve", "--quiet")[0] == 0
    assert capsys.readouterr().err == ""


def test_adapt_can_start_from_the_retrieved_mix(capsys, examples):
    done = job_body("succeeded", step=10, version=1, elapsed_s=3.0, result=RETRIEVED)
    routes = {("POST", "/adapt"): httpx.Response(202, json=job_body("queued", step=0)), ("GET", "/adapt/j1"): done}
    status, server = run(routes, "adapt", "new", "--examples", str(examples), "--init", "retrieve", "--steps", "10",
                         "--poll-interval", "0")
    assert status == 0 and json.loads(server.requests[0].content)["init"] == "retrieve"
    assert capsys.readouterr().err.endswith("10/10 succeeded loss 1.5000 in 3s\n"
                                            "new: started from the retrieved mix alpha=0.6,beta=0.4\n")


def test_adapt_exits_1_when_the_job_fails_and_no_wait_returns_at_once(capsys, examples):
    routes = {("POST", "/adapt"): httpx.Response(202, json=job_body("queued", step=0)),
              ("GET", "/adapt/j1"): job_body("failed", error="diverged")}
    assert run(routes, "adapt", "new", "--examples", str(examples), "--quiet")[0] == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["error"] == "diverged" and err == ""
    status, server = run(routes, "adapt", "new", "--examples", str(examples), "--no-wait")
    assert status == 0 and len(server.requests) == 1 and json.loads(capsys.readouterr().out)["state"] == "queued"


def test_adapt_reads_a_json_file_and_refuses_bad_examples(capsys, tmp_path):
    path = tmp_path / "examples.json"
    path.write_text(json.dumps([{"input": "a", "target": "b"}]))
    routes = {("POST", "/adapt"): httpx.Response(202, json=job_body("queued"))}
    assert run(routes, "adapt", "new", "--examples", str(path), "--no-wait")[0] == 0
    capsys.readouterr()
    path.write_text(json.dumps([{"input": "a"}]))
    status, server = run(routes, "adapt", "new", "--examples", str(path))
    assert status == 2 and server.requests == [] and capsys.readouterr().err.startswith("error: ")
    assert run(routes, "adapt", "new", "--examples", str(tmp_path / "missing.jsonl"))[0] == 2


@pytest.mark.parametrize(("answer", "code"), [
    (error(404, "unknown_task", "unknown task 'nope'", "task"), 2), (error(422, "validation_error", "bad", "x"), 2),
    (error(500, "internal_error", "broken"), 1), (httpx.ConnectError("connection refused"), 1),
])
def test_errors_print_a_message_and_set_the_exit_status(capsys, answer, code):
    status, _ = run({("POST", "/generate"): answer, ("GET", "/tasks/nope"): answer}, "generate", "nope", "x")
    assert status == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_export_prints_the_folder(capsys, tmp_path):
    data = make_zip({"alpha/adapter_config.json": "{}", "alpha/adapter_model.safetensors": "x"})
    status, _ = run({("GET", "/tasks/alpha/lora"): httpx.Response(200, content=data)}, "export", "alpha",
                    str(tmp_path))
    assert status == 0 and capsys.readouterr().out.strip() == str((tmp_path / "alpha").resolve())


def test_progress_line_without_steps():
    job = AdaptJob.model_validate(job_body("queued", step=0, steps=0, loss=None, eta_s=None))
    assert progress_line(job, width=4) == "new [----] 0/0 queued"
