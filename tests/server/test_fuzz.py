"""Property-based fuzzing of every route's body and path: never a 5xx, every 4xx carries a message."""

import json
import time
import urllib.parse

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.app import create_app
from tests.server.conftest import bundle_settings

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=40))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
TASKS = st.sampled_from(["alpha", "beta", "__mu__", "nope", "../etc", "", ".x", "a" * 70])
TEXTS = st.text(min_size=0, max_size=80) | st.lists(st.text(max_size=30), max_size=5)
SMALL = st.integers(-3, 40)
PLAUSIBLE = {
    "task": TASKS, "model": TASKS, "inputs": TEXTS, "prompt": TEXTS, "max_new_tokens": SMALL, "max_tokens": SMALL,
    "do_sample": st.booleans(), "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "top_k": SMALL,
    "seed": SMALL, "num_beams": st.integers(0, 4), "stop": st.lists(st.text(max_size=4), max_size=3),
    "stream": st.booleans(), "choices": st.lists(st.text(max_size=10), max_size=4)
    | st.lists(st.lists(st.text(max_size=5), max_size=3), max_size=3),
    "examples": st.lists(st.fixed_dictionaries({"input": st.text(max_size=20), "target": st.text(max_size=20)}),
                         max_size=4) | ANY_JSON,
    "method": st.sampled_from(["mhr-z", "poly-z", "mhr-mu", "lora"]), "steps": st.integers(-1, 3),
    "learning_rate": st.floats(-1, 2), "batch_size": SMALL, "validation_fraction": st.floats(-0.5, 1),
    "overwrite": st.booleans(), "n": st.integers(0, 2),
}
WORD = st.text(alphabet="abcdefgh xyz", min_size=1, max_size=12)
VALID = {
    "task": st.sampled_from(["alpha", "beta", "gamma", "__mu__"]),
    "inputs": WORD | st.lists(WORD, min_size=1, max_size=3),
    "max_new_tokens": st.integers(1, 8), "do_sample": st.booleans(), "temperature": st.floats(0.1, 2),
    "top_p": st.floats(0.1, 1), "top_k": st.integers(0, 50), "seed": st.integers(0, 99),
    "num_beams": st.integers(1, 3),
    "stop": st.lists(WORD, max_size=2), "stream": st.booleans(), "choices": st.lists(WORD, min_size=1, max_size=3),
    "examples": st.lists(st.fixed_dictionaries({"input": WORD, "target": WORD}), min_size=1, max_size=4),
    "method": st.sampled_from(["mhr-z", "poly-z", "mhr-mu"]), "steps": st.integers(1, 3),
    "learning_rate": st.floats(1e-4, 0.5), "batch_size": st.integers(1, 4),
    "validation_fraction": st.floats(0, 0.5),
    "overwrite": st.booleans(), "n": st.just(1), "model": st.sampled_from(["alpha", "beta"]),
    "prompt": WORD | st.lists(WORD, min_size=1, max_size=3), "max_tokens": st.integers(1, 8),
}
ROUTES = {
    "/generate": ["task", "inputs", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "seed",
                  "num_beams", "stop", "stream"],
    "/score": ["task", "inputs", "choices"],
    "/adapt": ["task", "examples", "method", "steps", "learning_rate", "batch_size", "seed",
               "validation_fraction", "overwrite"],
    "/v1/completions": ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "seed"],
}


@pytest.fixture(scope="module")
def fuzz_client(t5_bundle, tmp_path_factory):
    adapted = tmp_path_factory.mktemp("fuzz-adapted")
    settings_ = bundle_settings(t5_bundle, adapted_dir=adapted, adapt_max_steps=3, adapt_max_queued=10_000,
                                max_queue=10_000)
    with TestClient(create_app(settings_)) as client:
        yield client


def bodies(route: str):
    fields = ROUTES[route]
    valid = {**VALID, "task": st.sampled_from(["fz-1", "fz-2", "fz-3"])} if route == "/adapt" else VALID
    return st.one_of(
        ANY_JSON,
        st.fixed_dictionaries({}, optional={f: PLAUSIBLE[f] | ANY_JSON for f in fields}),
        st.fixed_dictionaries({f: PLAUSIBLE[f] for f in fields[:2]}, optional={f: PLAUSIBLE[f] for f in fields[2:]}),
        st.fixed_dictionaries({f: valid[f] for f in fields[:2]}, optional={f: valid[f] for f in fields[2:]}),
        st.fixed_dictionaries({f: valid[f] | PLAUSIBLE[f] for f in fields[:2]},
                              optional={f: valid[f] | PLAUSIBLE[f] for f in fields[2:]}),
    )


def check(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], response.text


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def jobs_when_idle(client, timeout: float = 120) -> list[dict]:
    """Every adaptation job, once none is queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = client.get("/adapt").json()["jobs"]
        if all(job["state"] not in ("queued", "running") for job in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.05)


@pytest.mark.parametrize("route", list(ROUTES))
def test_post_bodies_never_5xx(fuzz_client, route):
    @FUZZ
    @given(body=bodies(route))
    def run(body):
        check(fuzz_client.post(route, content=json.dumps(body), headers={"content-type": "application/json"}))

    run()
    if route == "/adapt":  # the accepted jobs all end, and none of them failed
        jobs = jobs_when_idle(fuzz_client)
        assert jobs, "fuzzing accepted no adaptation job"
        assert all(job["state"] == "succeeded" for job in jobs), [
            (job["task"], job["state"], job["error"]) for job in jobs if job["state"] != "succeeded"]


@FUZZ
@given(name=st.text(max_size=80), method=st.sampled_from(["GET", "DELETE"]),
       prefix=st.sampled_from(["/tasks/", "/adapt/", "/tasks/x/", "/"]))
def test_paths_never_5xx(fuzz_client, name, method, prefix):
    check(fuzz_client.request(method, prefix + urllib.parse.quote(name, safe="")))


@FUZZ
@given(raw=st.binary(max_size=200))
def test_raw_bytes_never_5xx(fuzz_client, raw):
    check(fuzz_client.post("/generate", content=raw, headers={"content-type": "application/json"}))
