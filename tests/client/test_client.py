"""Client and AsyncClient against httpx.MockTransport: bodies, headers, errors, retries, SSE, export safety."""

import asyncio
import json
from types import MappingProxyType

import httpx
import pytest

import client._client as client_module
from client import (
    AsyncClient,
    BadRequest,
    BrokenTask,
    Client,
    Conflict,
    ExportError,
    Forbidden,
    MhrError,
    NotFound,
    Overloaded,
    ServerError,
    StorageError,
    TransportError,
    Unauthorized,
    UnknownTask,
    ValidationError,
    WaitTimeout,
)
from client.models import Readiness, TaskInfo
from tests.client.fakes import (
    COMPOSED,
    GENERATED,
    MIX_NAME,
    MIXED,
    RETRIEVED,
    SSE,
    TASKS,
    Recorder,
    error,
    job_body,
    make_zip,
)


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch):
    slept = []
    monkeypatch.setattr(client_module, "_sleep", slept.append)

    async def async_sleep(seconds):
        slept.append(seconds)
    monkeypatch.setattr(client_module, "_async_sleep", async_sleep)
    return slept


def sync_client(recorder, **options):
    return Client("http://mhr.test", transport=httpx.MockTransport(recorder), **options)


def run_async(recorder, work, **options):
    async def go():
        async with AsyncClient("http://mhr.test", transport=httpx.MockTransport(recorder), **options) as mhr:
            return await work(mhr)
    return asyncio.run(go())


def test_generate_body_omits_none_options_and_parses():
    recorder = Recorder(httpx.Response(200, json=GENERATED))
    with sync_client(recorder) as mhr:
        response = mhr.generate("alpha", "hello")
        mhr.generate("alpha", ["a", "b"], max_new_tokens=4, top_k=0, stop=["."], do_sample=True, temperature=0.5)
    assert response.texts == ["hi"] and response.usage.completion_tokens == 2
    assert recorder.body(0) == {"task": "alpha", "inputs": "hello"}
    assert recorder.body(1) == {"task": "alpha", "inputs": ["a", "b"], "max_new_tokens": 4, "top_k": 0,
                                "stop": ["."], "do_sample": True, "temperature": 0.5}
    assert recorder.requests[0].url == "http://mhr.test/generate"


def test_async_generate_and_adapt_bodies():
    recorder = Recorder(httpx.Response(200, json=GENERATED), httpx.Response(202, json=job_body("queued")))

    async def work(mhr):
        return await mhr.generate("alpha", "x", seed=3), await mhr.adapt("new", [("a", "b"), {"input": "c",
                                                                                             "target": "d"}], steps=5)
    generated, job = run_async(recorder, work)
    assert generated.outputs[0].finish_reason == "length" and job.state == "queued" and not job.done
    assert recorder.body(0) == {"task": "alpha", "inputs": "x", "seed": 3}
    assert recorder.body(1) == {"task": "new", "method": "mhr-z", "steps": 5,
                                "examples": [{"input": "a", "target": "b"}, {"input": "c", "target": "d"}]}


def test_async_generate_and_stream_send_logprobs_and_guided_and_parse_token_logprobs():
    entry = {"token": "h", "id": 107, "logprob": -0.25, "top": [{"token": "h", "id": 107, "logprob": -0.25},
                                                                {"token": "j", "id": 109, "logprob": -2.0}]}
    with_logprobs = {**GENERATED, "outputs": [{**GENERATED["outputs"][0], "logprobs": [entry]}]}
    stream = httpx.Response(200, content=SSE.encode(), headers={"content-type": "text/event-stream"})
    recorder = Recorder(httpx.Response(200, json=with_logprobs), stream)
    schema = MappingProxyType({"json_schema": {"type": "object"}})

    async def work(mhr):
        generated = await mhr.generate("alpha", "x", logprobs=2, guided=schema)
        events = [event async for event in mhr.stream("alpha", "x", guided={"regex": "[a-z]+"})]
        return generated, events
    generated, events = run_async(recorder, work)
    output = generated.outputs[0]
    assert output.logprobs[0].logprob == -0.25 and [t.id for t in output.logprobs[0].top] == [107, 109]
    assert recorder.body(0) == {"task": "alpha", "inputs": "x", "logprobs": 2, "guided": {"json_schema": {
        "type": "object"}}}
    assert recorder.body(1) == {"task": "alpha", "inputs": "x", "stream": True, "guided": {"regex": "[a-z]+"}}
    assert events[-1].done


def test_a_mix_goes_where_a_task_name_goes_and_its_answer_has_no_version():
    scored = {"task": MIX_NAME, "version": None, "results": [{"best": "no", "best_index": 1, "best_by_mean_index": 1,
              "scores": [{"choice": "yes", "logprob_sum": -3.0, "logprob_mean": -1.5, "tokens": 2},
                         {"choice": "no", "logprob_sum": -1.0, "logprob_mean": -0.5, "tokens": 2}]}]}
    recorder = Recorder(httpx.Response(200, json=MIXED), httpx.Response(200, json=scored))
    mix = {"alpha": 3, "beta": 1.0}
    with sync_client(recorder) as mhr:
        generated = mhr.generate(mix, "hello")
        ranked = mhr.score(MappingProxyType(mix), "is it?", ["yes", "no"])  # any Mapping
    assert (generated.task, generated.version) == (MIX_NAME, None) and generated.texts == ["hi"]
    assert (ranked.task, ranked.version, ranked.results[0].best) == (MIX_NAME, None, "no")
    assert recorder.body(0) == {"task": {"mix": {"alpha": 3, "beta": 1.0}}, "inputs": "hello"}
    assert recorder.body(1) == {"task": {"mix": {"alpha": 3, "beta": 1.0}}, "inputs": "is it?",
                                "choices": ["yes", "no"]}
    streamed = Recorder(sse_response(SSE.replace('"version": 1', '"version": null')))

    async def work(mhr):
        return [event async for event in mhr.stream(mix, "hello", ignore_eos=True)]
    assert run_async(streamed, work)[-1].response.version is None
    assert streamed.body(0) == {"task": {"mix": mix}, "inputs": "hello", "ignore_eos": True, "stream": True}


def test_an_arrow_route_goes_where_a_task_name_goes_and_its_answer_has_the_routing():
    route = {"route": "arrow", "over": "skills", "top_k": 2, "temperature": 1.0}
    answer = {**MIXED, "task": "arrow(over=skills,top_k=2,temperature=1)", "version": None,
              "routing": {"skill-0": 0.75, "skill-1": 0.25}}
    recorder = Recorder(httpx.Response(200, json=answer))
    with sync_client(recorder) as mhr:
        generated = mhr.generate(route, "hello")
    assert recorder.body(0) == {"task": route, "inputs": "hello"}
    assert generated.routing == {"skill-0": 0.75, "skill-1": 0.25}


def test_generation_length_options_are_sent_only_when_given():
    recorder = Recorder(httpx.Response(200, json=GENERATED))

    async def work(mhr):
        await mhr.generate("alpha", "x", min_new_tokens=0, ignore_eos=False)
        return await mhr.generate({"alpha": 1}, "x", max_new_tokens=8, min_new_tokens=4, ignore_eos=True)
    run_async(recorder, work)
    assert recorder.body(0) == {"task": "alpha", "inputs": "x", "min_new_tokens": 0, "ignore_eos": False}
    assert recorder.body(1) == {"task": {"mix": {"alpha": 1}}, "inputs": "x", "max_new_tokens": 8,
                                "min_new_tokens": 4, "ignore_eos": True}


def test_compose_posts_a_named_mix_and_returns_its_recipe():
    recorder = Recorder(httpx.Response(201, json=COMPOSED))
    with sync_client(recorder, api_key="k") as mhr:
        info = mhr.compose("blend", {"alpha": 3, "beta": 1})
    assert (info.kind, info.version, info.mix) == ("composed", 2, {"alpha": 0.75, "beta": 0.25})
    request = recorder.requests[0]
    assert (request.method, request.url.path, request.headers["authorization"]) == ("POST", "/tasks", "Bearer k")
    assert recorder.body(0) == {"name": "blend", "mix": {"alpha": 3, "beta": 1}}
    assert run_async(recorder, lambda mhr: mhr.compose("blend", MappingProxyType({"alpha": 1}), overwrite=True)) == info
    assert recorder.body(1) == {"name": "blend", "mix": {"alpha": 1}, "overwrite": True}
    assert TaskInfo.model_validate(TASKS["tasks"][0]).mix is None  # the other kinds have no recipe


def test_compose_refusals_map_to_the_exception_tree():
    recorder = Recorder(error(422, "validation_error", "mix.nope: unknown task 'nope'", field="mix.nope"),
                        error(409, "conflict", "task 'blend' already exists", field="task"))
    with sync_client(recorder) as mhr:
        with pytest.raises(ValidationError) as caught:
            mhr.compose("blend", {"nope": 1})
        assert caught.value.field == "mix.nope"
        with pytest.raises(Conflict):
            mhr.compose("blend", {"alpha": 1})
    assert len(recorder.requests) == 2  # a POST: never retried


def test_adapt_by_retrieval_sends_init_and_k_and_parses_the_result():
    done = job_body("succeeded", step=1, method="retrieve", version=1, result=RETRIEVED)
    recorder = Recorder(httpx.Response(202, json=job_body("queued", step=0, method="retrieve")),
                        httpx.Response(200, json=done))
    with sync_client(recorder) as mhr:
        queued = mhr.adapt("new", [("a", "b")], method="retrieve", k=2)
        job = mhr.wait(queued)
    assert queued.result is None and queued.mix is None
    assert job.mix == {"alpha": 0.6, "beta": 0.4} and job.result["candidates"][2]["task"] == "__mu__"
    assert recorder.body(0) == {"task": "new", "method": "retrieve", "k": 2,
                                "examples": [{"input": "a", "target": "b"}]}
    run_async(recorder, lambda mhr: mhr.adapt("new", [("a", "b")], init="retrieve", k=4, steps=50))
    assert recorder.body(-1) == {"task": "new", "method": "mhr-z", "init": "retrieve", "k": 4, "steps": 50,
                                 "examples": [{"input": "a", "target": "b"}]}


def test_api_key_is_sent_as_bearer_token():
    recorder = Recorder(httpx.Response(200, json=TASKS))
    with sync_client(recorder, api_key="s3cret") as mhr:
        assert [t.name for t in mhr.tasks()] == ["alpha"]
    run_async(recorder, lambda mhr: mhr.tasks(), api_key="s3cret")
    assert all(r.headers["authorization"] == "Bearer s3cret" for r in recorder.requests)
    with sync_client(recorder) as mhr:
        mhr.tasks()
    assert "authorization" not in recorder.requests[-1].headers


@pytest.mark.parametrize(("status", "type_", "cls"), [
    (400, "bad_request", BadRequest), (413, "too_large", BadRequest), (422, "validation_error", ValidationError),
    (401, "unauthorized", Unauthorized), (403, "forbidden", Forbidden), (404, "unknown_job", NotFound),
    (404, "unknown_task", UnknownTask), (409, "conflict", Conflict), (500, "internal_error", ServerError),
    (502, "http_error", ServerError), (409, "broken_task", BrokenTask), (507, "storage_full", StorageError),
    (503, "storage_unavailable", StorageError),
])
def test_error_statuses_map_to_exceptions(status, type_, cls):
    recorder = Recorder(error(status, type_, "it failed", field="inputs"))
    with sync_client(recorder, retries=0) as mhr, pytest.raises(cls) as caught:
        mhr.generate("alpha", "x")
    assert (caught.value.status, caught.value.type, caught.value.field) == (status, type_, "inputs")
    assert str(caught.value) == "it failed"
    with pytest.raises(cls):
        run_async(recorder, lambda mhr: mhr.generate("alpha", "x"))


def test_overloaded_carries_retry_after_and_odd_bodies_still_map():
    recorder = Recorder(error(503, "overloaded", headers={"Retry-After": "7"}))
    with sync_client(recorder) as mhr, pytest.raises(Overloaded) as caught:
        mhr.score("alpha", "x", ["a", "b"])
    assert caught.value.retry_after == 7 and len(recorder.requests) == 1  # POST: never retried
    with sync_client(Recorder(httpx.Response(502, text="bad gateway"))) as mhr, pytest.raises(ServerError) as caught:
        mhr.health()
    assert "bad gateway" in caught.value.message and caught.value.field is None


def test_get_is_retried_after_503_honouring_retry_after(_no_sleep):
    recorder = Recorder(error(503, "overloaded", headers={"Retry-After": "3"}), httpx.Response(200, json=TASKS))
    with sync_client(recorder) as mhr:
        assert mhr.tasks()[0].name == "alpha"
    assert len(recorder.requests) == 2 and _no_sleep == [3.0]


def test_get_and_delete_retry_transport_errors_up_to_the_limit(_no_sleep):
    recorder = Recorder(httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.Response(200, json=TASKS))
    assert run_async(recorder, lambda mhr: mhr.tasks())[0].kind == "pretrained"
    assert len(recorder.requests) == 3 and _no_sleep == [0.25, 0.5]
    recorder = Recorder(httpx.ConnectError("refused"))
    with sync_client(recorder, retries=1) as mhr, pytest.raises(TransportError, match="refused"):
        mhr.delete_task("alpha")
    assert [r.method for r in recorder.requests] == ["DELETE", "DELETE"]


def test_post_is_never_retried():
    for answer in (httpx.ConnectError("refused"), error(503, "overloaded", headers={"Retry-After": "0"})):
        recorder = Recorder(answer)
        with sync_client(recorder) as mhr, pytest.raises((TransportError, Overloaded)):
            mhr.adapt("new", [("a", "b")])
        with pytest.raises((TransportError, Overloaded)):
            run_async(recorder, lambda mhr: mhr.generate("alpha", "x"))
        assert [r.method for r in recorder.requests] == ["POST", "POST"]


def sse_response(text):
    return httpx.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})


def test_stream_parses_server_sent_events_sync_and_async():
    recorder = Recorder(sse_response(SSE))
    with sync_client(recorder) as mhr:
        events = list(mhr.stream("alpha", "hello", max_new_tokens=2))
    assert recorder.body(0) == {"task": "alpha", "inputs": "hello", "max_new_tokens": 2, "stream": True}
    assert [(e.index, e.text) for e in events[:-1]] == [(0, "h"), (0, "i")]
    assert events[-1].done and events[-1].response.texts == ["hi"]

    async def work(mhr):
        return [event async for event in mhr.stream("alpha", "hello")]
    assert run_async(recorder, work) == events


def test_stream_errors_in_band_before_and_when_cut_off():
    in_band = 'data: {"index": 0, "text": "h"}\n\nevent: error\ndata: {"error": {"type": "X", "message": "boom"}}\n\n'
    with sync_client(Recorder(sse_response(in_band))) as mhr, pytest.raises(ServerError, match="boom"):
        list(mhr.stream("alpha", "x"))
    with sync_client(Recorder(error(404, "unknown_task", field="task"))) as mhr, pytest.raises(UnknownTask):
        list(mhr.stream("nope", "x"))
    cut_off = sse_response('data: {"index": 0, "text": "h"}\n\n')
    with sync_client(Recorder(cut_off)) as mhr, pytest.raises(TransportError, match="done"):
        list(mhr.stream("alpha", "x"))


def test_wait_polls_until_final_state_and_reports_progress():
    recorder = Recorder(httpx.Response(200, json=job_body()), httpx.Response(200, json=job_body(step=6)),
                        httpx.Response(200, json=job_body("succeeded", step=10, version=1)))
    seen = []
    with sync_client(recorder) as mhr:
        job = mhr.wait("j1", poll_interval=0.01, on_progress=seen.append)
    assert job.state == "succeeded" and job.version == 1 and [j.step for j in seen] == [3, 6, 10]
    assert all(r.url.path == "/adapt/j1" for r in recorder.requests)
    recorder = Recorder(httpx.Response(200, json=job_body()))
    with pytest.raises(WaitTimeout) as caught:
        run_async(recorder, lambda mhr: mhr.wait("j1", poll_interval=0.01, timeout=0))
    assert caught.value.job.state == "running"


def test_cancel_of_a_running_job_reads_running_with_cancel_requested():
    recorder = Recorder(httpx.Response(200, json=job_body(cancel_requested=True)))
    with sync_client(recorder) as mhr:
        job = mhr.cancel("j1")
    assert job.state == "running" and job.cancel_requested and not job.done
    assert recorder.requests[0].method == "DELETE" and recorder.requests[0].url.path == "/adapt/j1"


def test_export_extracts_into_the_destination(tmp_path):
    data = make_zip({"alpha/adapter_config.json": '{"peft_type": "LORA"}', "alpha/adapter_model.safetensors": "x"})
    recorder = Recorder(httpx.Response(200, content=data, headers={"content-type": "application/zip"}))
    with sync_client(recorder, api_key="k") as mhr:
        folder = mhr.export("alpha", tmp_path / "out")
    assert folder == (tmp_path / "out" / "alpha").resolve()
    assert json.loads((folder / "adapter_config.json").read_text()) == {"peft_type": "LORA"}
    assert recorder.requests[0].url.path == "/tasks/alpha/lora"
    assert run_async(recorder, lambda mhr: mhr.export("alpha", tmp_path / "again")).name == "alpha"


@pytest.mark.parametrize("name", ["../evil.txt", "alpha/../../evil.txt", "/abs/evil.txt", "C:/evil.txt"])
def test_export_refuses_entries_outside_the_destination(tmp_path, name):
    data = make_zip({"alpha/adapter_config.json": "{}", name: "pwned"})
    with sync_client(Recorder(httpx.Response(200, content=data))) as mhr, pytest.raises(ExportError):
        mhr.export("alpha", tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()  # nothing written at all
    with sync_client(Recorder(httpx.Response(200, content=b"not a zip"))) as mhr, pytest.raises(ExportError):
        mhr.export("alpha", tmp_path / "out")


def test_ready_reports_loading_without_raising_and_names_are_quoted():
    recorder = Recorder(httpx.Response(503, json={"status": "loading"}))
    with sync_client(recorder) as mhr:
        assert not mhr.ready().ready
        assert len(recorder.requests) == 1  # a probe is not retried
    recorder = Recorder(httpx.Response(200, json=TASKS["tasks"][0]))
    with sync_client(recorder) as mhr:
        mhr.task("a/b")
    assert recorder.requests[0].url.raw_path == b"/tasks/a%2Fb"


def test_bad_examples_are_refused_before_sending():
    recorder = Recorder(httpx.Response(202, json=job_body()))
    with sync_client(recorder) as mhr, pytest.raises(ValueError, match="example 1"):
        mhr.adapt("new", [("a", "b"), {"input": "only"}])
    assert recorder.requests == []


def test_an_unexpected_success_body_is_an_mhr_error():
    with sync_client(Recorder(httpx.Response(200, text="<html>proxy</html>"))) as mhr, \
            pytest.raises(MhrError, match="unexpected answer to GET /tasks"):
        mhr.tasks()


def test_a_broken_task_and_the_readiness_that_lists_it_parse():
    broken = {"name": "bad", "kind": "broken", "version": 0, "method": "unknown",
              "reason": "/srv/adapted/bad.safetensors: cannot read safetensors header"}
    info = TaskInfo.model_validate(broken)
    assert info.broken and info.reason.startswith("/srv/adapted/bad.safetensors")
    assert not TaskInfo.model_validate({**broken, "kind": "adapted", "reason": None}).broken
    ready = Readiness.model_validate({"status": "ready", "tasks": 3, "broken_tasks": [
        {"name": "bad", "file": "/srv/adapted/bad.safetensors", "reason": "truncated"}]})
    assert [b.file for b in ready.broken_tasks] == ["/srv/adapted/bad.safetensors"]
    assert Readiness.model_validate({"status": "loading"}).broken_tasks == []
