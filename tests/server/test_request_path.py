"""What a /generate request costs the process besides its tokens: its inputs are tokenised once (the route checks
their length and hands the ids on; the serving loop does not tokenise again), and a request that asks for no
structured output never waits for a worker thread (its dependencies and grammar are resolved on the event loop)."""

import threading

import pytest

from server import guided_spec


def _counting_tokenizer(monkeypatch, tokenizer_type) -> list[str]:
    calls: list[str] = []
    original = tokenizer_type.__call__

    def counting(self, text, *args, **kwargs):
        calls.append(text if isinstance(text, str) else repr(text))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_type, "__call__", counting)
    return calls


def test_generate_tokenises_each_input_once(module_client, monkeypatch):
    engine = module_client.app.state.engine
    calls = _counting_tokenizer(monkeypatch, type(engine.tokenizer))
    response = module_client.post("/generate", json={"task": "alpha", "inputs": ["hello", "world!"],
                                                     "max_new_tokens": 3})
    assert response.status_code == 200
    assert sorted(calls) == ["hello", "world!"]
    alone = module_client.post("/generate", json={"task": "alpha", "inputs": "world!", "max_new_tokens": 3}).json()
    assert alone["outputs"][0]["text"] == response.json()["outputs"][1]["text"]  # the ids handed on serve the row
    assert alone["usage"]["prompt_tokens"] == response.json()["outputs"][1]["prompt_tokens"]


def test_no_worker_thread_for_a_request_without_structured_output(module_client, monkeypatch):
    used: list[str] = []

    async def recording(function, *args, **kwargs):
        used.append(threading.current_thread().name)
        return function(*args, **kwargs)

    monkeypatch.setattr(guided_spec, "run_in_threadpool", recording)
    plain = module_client.post("/generate", json={"task": "alpha", "inputs": "hello", "max_new_tokens": 2})
    assert plain.status_code == 200 and used == []
    guided = module_client.post("/generate", json={"task": "alpha", "inputs": "hello", "max_new_tokens": 4,
                                                   "guided": {"choice": ["ab", "cd"]}})
    assert guided.status_code == 200 and len(used) == 1  # a grammar is still compiled off the event loop


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_dependencies_run_on_the_event_loop(module_client, route, monkeypatch):
    """FastAPI runs a plain-function dependency in a worker thread: ours are coroutines."""
    from server import deps

    threads: list[str] = []
    original = deps._state

    def recording(request, name):
        threads.append(threading.current_thread().name)
        return original(request, name)

    monkeypatch.setattr(deps, "_state", recording)
    body = {"task": "alpha", "inputs": "hi", "max_new_tokens": 1} if route == "/generate" else \
        {"model": "alpha", "prompt": "hi", "max_tokens": 1}
    assert module_client.post(route, json=body).status_code == 200
    assert threads and all(not name.startswith("AnyIO worker") for name in threads)
