import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from server.app import create_app
from server.settings import Settings
from tests.factories import save_bundle


@pytest.fixture(scope="package")
def t5_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5-bundle")
    save_bundle(folder, "t5", task_names=["alpha", "beta", "gamma"])
    return folder


def bundle_settings(folder, **overrides) -> Settings:
    values = dict(model=folder / "model", inventory=folder / "inventory", device="cpu", max_input_tokens=64,
                  max_new_tokens=16, default_max_new_tokens=8, max_batch_wait_ms=20)
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="package")
def tokenizer(t5_bundle):
    """The T5 bundle's tokenizer, as the server loads it."""
    return AutoTokenizer.from_pretrained(t5_bundle / "model")


@pytest.fixture(scope="package")
def client(t5_bundle):
    with TestClient(create_app(bundle_settings(t5_bundle))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def module_client(t5_bundle):
    """An app of the test module's own (its tasks and routes apart from the package's `client`)."""
    with TestClient(create_app(bundle_settings(t5_bundle))) as test_client:
        yield test_client


@pytest.fixture(scope="package")
def printable_bundle(tmp_path_factory):
    """Output layer not sharpened (sampling really varies) and only printable ASCII ever emitted: no
    end-of-sequence, so every row runs to its max_new_tokens and each token is one visible character."""
    folder = tmp_path_factory.mktemp("printable-bundle")
    save_bundle(folder, "t5", task_names=["alpha", "beta", "gamma"], sharp=False, printable=True)
    return folder


@asynccontextmanager
async def serving(app):
    """Run the app's lifespan and yield an httpx.AsyncClient on it: requests sent together (asyncio.gather)
    reach the server together, as from concurrent clients."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            yield http


def texts(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [o["text"] for o in response.json()["outputs"]]


def metric_values(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(sample name, frozenset of label items): value}."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(values: dict, name: str, **labels) -> float:
    """One sample's value (0 if the series is absent)."""
    return values.get((name, frozenset(labels.items())), 0.0)


def wait_job(client, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 120,
             headers: dict | None = None) -> dict:
    """Poll GET /adapt/{job} (a TestClient or httpx.Client) until the job is in one of `states`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/adapt/{job_id}", headers=headers).json()
        if job["state"] in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")


async def await_job(http: httpx.AsyncClient, job_id: str, states=("succeeded", "failed", "cancelled"),
                    timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = (await http.get(f"/adapt/{job_id}")).json()
        if job["state"] in states:
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s")


def request_rows(body: dict) -> int:
    inputs = body.get("inputs", body.get("prompt"))
    return len(inputs) if isinstance(inputs, list) else 1


async def send_together(http: httpx.AsyncClient, bodies: list[dict], path: str = "/generate"):
    """POST the bodies at once. Returns (responses, batched): batched is True when the rows-per-batch metric
    (rows per decoding step) saw a batch with more rows than any one of these requests has."""
    before = metric_values((await http.get("/metrics")).text)
    responses = await asyncio.gather(*(http.post(path, json=body) for body in bodies))
    after = metric_values((await http.get("/metrics")).text)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    largest = max(map(request_rows, bodies))
    bound = next(b for b in (1, 2, 4, 8, 16, 32, 64) if b >= largest)  # a bucket of the histogram
    return responses, delta("mhr_batch_rows_count") > delta("mhr_batch_rows_bucket", le=str(float(bound)))


def sse_events(lines) -> Iterator[tuple[str | None, dict | str]]:
    """(event name or None, data: parsed JSON, or "[DONE]") for each event of a text/event-stream's lines."""
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, (line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
            event = None
