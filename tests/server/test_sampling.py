"""Sampling over HTTP on a model whose sampled text really varies (its output layer is not sharpened):
the seed and do_sample are honoured, a seed repeats, and a seeded request does not depend on what else
runs in its batch."""

import asyncio

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.server.conftest import bundle_settings, send_together, serving, texts

SAMPLED = {"do_sample": True, "temperature": 2.0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def sampling_client(printable_bundle):
    with TestClient(create_app(bundle_settings(printable_bundle))) as client:
        yield client


def sample(client, seed, task="alpha", inputs="sample me", **extra):
    body = {"task": task, "inputs": inputs, **SAMPLED, "seed": seed, **extra}
    return texts(client.post("/generate", json=body))


def test_sampling_varies_by_seed_differs_from_greedy_and_a_seed_repeats(sampling_client):
    greedy = texts(sampling_client.post("/generate", json={"task": "alpha", "inputs": "sample me",
                                                           "max_new_tokens": 12}))[0]
    by_seed = {seed: sample(sampling_client, seed)[0] for seed in range(6)}
    # the model is such that sampling really varies: not a test that passes when sampling is ignored
    assert len(set(by_seed.values())) >= 3, by_seed
    assert any(text != greedy for text in by_seed.values()), (greedy, by_seed)
    for seed in (0, 3):
        assert sample(sampling_client, seed)[0] == by_seed[seed]
    # a seed repeats whatever ran in between, also for a request of several inputs
    several = sample(sampling_client, 5, task="beta", inputs=["something else", "and more"])
    sample(sampling_client, None, task="gamma", inputs=["unseeded", "in between"])
    assert sample(sampling_client, 5, task="beta", inputs=["something else", "and more"]) == several


def test_unseeded_sampling_varies_from_call_to_call(sampling_client):
    drawn = {sample(sampling_client, None)[0] for _ in range(4)}
    assert len(drawn) >= 2, drawn


def test_openai_temperature_and_seed(sampling_client):
    def complete(**extra):
        body = {"model": "alpha", "prompt": "sample me", "max_tokens": 12, **extra}
        response = sampling_client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    greedy = complete(temperature=0)
    assert greedy == texts(sampling_client.post("/generate", json={"task": "alpha", "inputs": "sample me",
                                                                   "max_new_tokens": 12}))[0]
    by_seed = {seed: complete(temperature=2.0, seed=seed) for seed in range(4)}
    assert len(set(by_seed.values())) >= 2 and any(t != greedy for t in by_seed.values()), (greedy, by_seed)
    assert complete(temperature=2.0, seed=2) == by_seed[2]


def _busy_batch(printable_bundle, probes: list[dict], neighbours: list[dict]):
    """Each probe alone, then the probes amid their neighbours, all sent together.
    Returns (alone, together, batched: see send_together)."""
    app = create_app(bundle_settings(printable_bundle, max_batch_size=32, max_batch_wait_ms=50))

    async def scenario():
        async with serving(app) as http:
            alone = [texts(await http.post("/generate", json=body)) for body in probes]
            bodies = [*neighbours[:2], *probes, *neighbours[2:]]  # probes in the middle of the batch
            responses, batched = await send_together(http, bodies)
            first = len(neighbours[:2])
            assert all(r.status_code == 200 for r in responses)
            return alone, [texts(r) for r in responses[first: first + len(probes)]], batched

    return asyncio.run(scenario())


def test_seeded_request_among_greedy_and_other_seed_neighbours_equals_it_alone(printable_bundle):
    probes = [{"task": "alpha", "inputs": "sample me", **SAMPLED, "seed": 7},
              {"task": "beta", "inputs": ["two rows", "of one request"], **SAMPLED, "seed": 8}]
    neighbours = [{"task": "gamma", "inputs": ["greedy one", "greedy two"], "max_new_tokens": 12},
                  {"task": "__mu__", "inputs": "other seed", **SAMPLED, "seed": 9},
                  {"task": "alpha", "inputs": "greedy", "max_new_tokens": 5},
                  {"task": "beta", "inputs": "hotter", **SAMPLED, "temperature": 3.0, "seed": 10}]
    alone, together, batched = _busy_batch(printable_bundle, probes, neighbours)
    assert batched, "the requests were not batched together"
    assert together == alone


def test_unseeded_and_seeded_sampled_requests_share_a_batch(printable_bundle):
    probes = [{"task": "alpha", "inputs": "seeded", **SAMPLED, "seed": 7},
              {"task": "gamma", "inputs": "greedy", "max_new_tokens": 12}]
    neighbours = [{"task": "beta", "inputs": "unseeded", **SAMPLED},
                  {"task": "__mu__", "inputs": "unseeded too", **SAMPLED}]
    alone, together, batched = _busy_batch(printable_bundle, probes, neighbours)
    assert batched, "seeded and unseeded sampled requests were not run in one batch"
    assert together[1] == alone[1]


def test_seeded_requests_with_the_same_seed_in_one_busy_batch_each_equal_it_alone(printable_bundle):
    probes = [{"task": "alpha", "inputs": "sample me", **SAMPLED, "seed": 7},
              {"task": "beta", "inputs": "another input", **SAMPLED, "seed": 7},
              {"task": "gamma", "inputs": ["third", "fourth"], **SAMPLED, "seed": 7},
              {"task": "__mu__", "inputs": "sample me", **SAMPLED, "seed": 7}]
    neighbours = [{"task": "gamma", "inputs": "greedy", "max_new_tokens": 12},
                  {"task": "alpha", "inputs": "other seed", **SAMPLED, "seed": 3}]
    alone, together, batched = _busy_batch(printable_bundle, probes, neighbours)
    assert batched, "the requests were not batched together"
    assert together == alone
