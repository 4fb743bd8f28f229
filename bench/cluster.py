"""The Ray Serve scale-out (server/cluster) on a local Ray instance of its own: task affinity, freshness of the
shared store, a replica killed under load, throughput. Prints one JSON object.

    affinity_hit_rate               share of requests served by a replica where the task's adapter was already
                                    resident (its X-MHR-Resident header): 2 replicas, Zipf(1.1) over 64 tasks (the
                                    demo's 24 and 40 compositions), after warm-up                         goal >= 0.9
    adapted_visible_all_replicas_s  after an adapt, an overwrite and a delete (each finished at t=0), the latest t at
                                    which any replica still answered the old state (4 clients polling GET /tasks/x;
                                    each replica must also have answered the new state)                   goal <= 1.0
    failed_requests_on_replica_kill non-200 answers of a steady stream of /generate and /score (4 clients) while one
                                    replica is kill -9'd and Ray Serve starts its replacement              goal 0
    tokens_per_s_2_replicas_vs_1    generated tokens/s with 2 replicas vs 1 (the same per-replica settings, 1 thread
                                    each), 16 concurrent clients
Usage: .venv/bin/python bench/cluster.py [--quick] [--tasks-per-replica 40]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import ray
from ray import serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.serving_http import free_port  # noqa: E402
from server.cluster.__main__ import wait  # noqa: E402
from server.cluster.app import ClusterArgs, build  # noqa: E402

EXAMPLES = [{"input": f"hello {i}", "target": f"HELLO {i}"} for i in range(8)]


@contextlib.contextmanager
def local_ray(cpus: int):
    temp_dir = tempfile.mkdtemp(prefix="mhr-ray-", dir="/tmp")
    ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}})
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def deploy(url: str, replicas: int, tasks_per_replica: int, settings: dict) -> float:
    start = time.perf_counter()
    args = ClusterArgs(replicas=replicas, replica_cpus=1, ingress_cpus=0.5, tasks_per_replica=tasks_per_replica,
                       settings=settings)
    serve.run(build(args), name="mhr", route_prefix="/")
    wait(url, replicas, timeout_s=300)
    return time.perf_counter() - start


def compose_tasks(http: httpx.Client, n: int) -> list[str]:
    """The pretrained tasks and n named compositions of two of them: the workload's tasks."""
    pretrained = [t["name"] for t in http.get("/tasks").json()["tasks"] if t["kind"] == "pretrained"]
    for i in range(n):
        mix = {pretrained[i % len(pretrained)]: 0.6, pretrained[(7 * i + 3) % len(pretrained)]: 0.4}
        http.post("/tasks", json={"name": f"mix-{i:02d}", "mix": mix, "overwrite": True}).raise_for_status()
    return pretrained + [f"mix-{i:02d}" for i in range(n)]


async def _send(http: httpx.AsyncClient, jobs: list, out: list, path: str = "/generate") -> None:
    while jobs:
        body = jobs.pop()
        out.append(await http.post(path, json=body))


async def _load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[httpx.Response], float]:
    jobs, out = list(reversed(bodies)), []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(_send(http, jobs, out) for _ in range(concurrency)))
        return out, time.perf_counter() - start


def affinity(url: str, tasks: list[str], warm_up: int, requests: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(tasks))]
    order = rng.sample(tasks, len(tasks))  # which task is hot: not the inventory's order

    def bodies(n: int) -> list[dict]:
        return [{"task": task, "inputs": f"request {i}", "max_new_tokens": 4}
                for i, task in enumerate(rng.choices(order, weights, k=n))]

    asyncio.run(_load(url, [{"task": t, "inputs": "warm", "max_new_tokens": 4} for t in tasks], 8))
    asyncio.run(_load(url, bodies(warm_up), 8))
    time.sleep(1.0)  # the replicas' reports of what they hold reach the routers
    responses, _ = asyncio.run(_load(url, bodies(requests), 8))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:3]
    hits = sum(r.headers["x-mhr-resident"] == "true" for r in responses)
    per_replica: dict[str, int] = {}
    for r in responses:
        per_replica[r.headers["x-mhr-replica"]] = per_replica.get(r.headers["x-mhr-replica"], 0) + 1
    return {"affinity_hit_rate": round(hits / len(responses), 4), "affinity_requests": len(responses),
            "affinity_requests_per_replica": sorted(per_replica.values())}


async def _observe(http: httpx.AsyncClient, path: str, until: list[float], seen: dict) -> None:
    """GET path from 4 clients (no task: a replica at random each time) until the wall time until[0] (which the
    caller sets once it knows); per replica, (wall time the request was sent, status, body)."""
    async def poll() -> None:
        while time.time() < until[0]:
            sent = time.time()
            response = await http.get(path)
            seen.setdefault(response.headers["x-mhr-replica"], []).append(
                (sent, response.status_code, response.json()))

    await asyncio.gather(*(poll() for _ in range(4)))


def _stale_until(seen: dict, since: float, fresh, replicas: int) -> float:
    """The latest time after `since` at which a replica still answered the old state (every replica must have
    answered the new one)."""
    if len(seen) < replicas or not all(any(fresh(s, b) for _, s, b in answers) for answers in seen.values()):
        return float("inf")
    return max((t - since for answers in seen.values() for t, s, b in answers if t > since and not fresh(s, b)),
               default=0.0)


async def _change(url: str, method: str, path: str, body: dict | None) -> tuple[float, dict]:
    """Make the change (an adapt job, polled to its end, or a delete) while 4 clients keep reading the task;
    (seconds after the change until the last stale answer, the job or response)."""
    seen: dict = {}
    until = [float("inf")]
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        watcher = asyncio.create_task(_observe(http, "/tasks/bench-new", until, seen))
        response = (await http.request(method, path, json=body)).json()
        if method == "POST":
            while (response := (await http.get(f"/adapt/{response['id']}")).json())["state"] in ("queued", "running"):
                await asyncio.sleep(0.05)
            since, fresh = response["finished"], lambda s, b, v=response["version"]: s == 200 and b["version"] == v
        else:
            since, fresh = time.time(), lambda s, b: s == 404
        until[0] = since + 1.5
        await watcher
    return _stale_until(seen, since, fresh, 2), response


def visibility(url: str) -> dict:
    """Adapt a task, overwrite it, delete it: for each, how long a replica still answered the old state."""
    times = {}
    for event, overwrite in (("adapted", False), ("overwritten", True)):
        body = {"task": "bench-new", "examples": EXAMPLES, "steps": 5, "overwrite": overwrite}
        times[event], job = asyncio.run(_change(url, "POST", "/adapt", body))
        assert job["state"] == "succeeded", job
    times["deleted"], _ = asyncio.run(_change(url, "DELETE", "/tasks/bench-new", None))
    return {"adapted_visible_all_replicas_s": round(max(times.values()), 3),
            "visible_s_by_event": {k: round(v, 3) for k, v in times.items()}}


async def _steady(url: str, tasks: list[str], stop: asyncio.Event, out: list) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        i = 0
        while not stop.is_set():
            task = tasks[i % len(tasks)]
            if i % 3:
                response = await http.post("/generate", json={"task": task, "inputs": f"steady {i}",
                                                              "max_new_tokens": 8})
            else:
                response = await http.post("/score", json={"task": task, "inputs": "abc", "choices": ["x", "y"]})
            out.append((time.perf_counter(), response))
            i += 1


def replica_kill(url: str, tasks: list[str]) -> dict:
    async def scenario() -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            victim = await http.get("/readyz")
        name, pid = victim.headers["x-mhr-replica"], int(victim.headers["x-mhr-replica-pid"])
        stop, out = asyncio.Event(), []
        clients = [asyncio.create_task(_steady(url, tasks[w::4], stop, out)) for w in range(4)]
        await asyncio.sleep(2.0)
        before = {r.headers.get("x-mhr-replica") for _, r in out}
        os.kill(pid, signal.SIGKILL)
        killed = time.perf_counter()
        replaced = None
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:  # no task: any replica, the new one too
            while replaced is None and time.perf_counter() - killed < 180:
                await asyncio.sleep(0.2)
                answer = await http.get("/readyz")
                if answer.status_code == 200 and answer.headers["x-mhr-replica"] not in before | {name}:
                    replaced = time.perf_counter() - killed
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*clients)
        during = [r for t, r in out if t > killed]
        return {"failed_requests_on_replica_kill": sum(r.status_code != 200 for _, r in out),
                "requests_during_kill": len(during), "replacement_answered_s": round(replaced or float("inf"), 1)}

    return asyncio.run(scenario())


def throughput(url: str, tasks: list[str], requests: int) -> float:
    bodies = [{"task": tasks[i % len(tasks)], "inputs": f"input number {i:05d}", "max_new_tokens": 16,
               "ignore_eos": True} for i in range(requests)]
    asyncio.run(_load(url, bodies[:32], 16))  # warm-up
    responses, seconds = asyncio.run(_load(url, bodies, 16))
    assert all(r.status_code == 200 for r in responses)
    return sum(r.json()["usage"]["completion_tokens"] for r in responses) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests (about 4 minutes on 2 cores)")
    parser.add_argument("--tasks-per-replica", type=int, default=40, help="resident tasks per replica (64 tasks)")
    args = parser.parse_args()
    scale = 1 if args.quick else 3
    adapted = Path(tempfile.mkdtemp(prefix="mhr-bench-adapted-"))
    settings = {"adapted_dir": str(adapted), "device": "cpu", "threads": 1, "max_batch_size": 16}
    url = f"http://127.0.0.1:{free_port()}"
    result: dict = {"replicas": 2, "tasks": 64, "tasks_per_replica": args.tasks_per_replica, "threads_per_replica": 1,
                    "cpus": os.cpu_count()}
    try:
        with local_ray(cpus=4):
            serve.start(http_options={"host": "127.0.0.1", "port": int(url.rsplit(":", 1)[1])})
            result["deploy_2_replicas_s"] = round(deploy(url, 2, args.tasks_per_replica, settings), 1)
            with httpx.Client(base_url=url, timeout=60) as http:
                tasks = compose_tasks(http, 64 - 24)
            result.update(affinity(url, tasks, warm_up=200 * scale, requests=400 * scale))
            result.update(visibility(url))
            two = throughput(url, tasks, 96 * scale)
            result.update(replica_kill(url, tasks))
            deploy(url, 1, args.tasks_per_replica, settings)
            one = throughput(url, tasks, 96 * scale)
            result.update({"tokens_per_s_2_replicas": round(two, 1), "tokens_per_s_1_replica": round(one, 1),
                           "tokens_per_s_2_replicas_vs_1": round(two / one, 3)})
    finally:
        shutil.rmtree(adapted, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
