"""Bounded soak on loopback: N concurrent clients for S seconds mixing generate / score / tasks / adapt
against a real uvicorn server process (the demo bundle unless --model/--inventory). Prints JSON with
request counts, errors (any non-2xx or transport error), latency percentiles, the server's peak RSS and
the adaptation jobs by final state (after waiting for the ones still queued or running).

Meanwhile a fault phase (soak_faults.py) runs on a second server process: an adaptation job on a full disk, a
composed task whose file is corrupted on disk (409), other tasks served throughout; its keys start with faults_.

    .venv/bin/python bench/soak.py [--clients 64] [--seconds 60]
Exit status 1 if any request failed or any adaptation job ended failed, or if the fault phase saw a 5xx, another
task failing, or its faults not reported as they should be (job failed naming the folder, the broken task 409).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.serving_http import free_port, start_server  # noqa: E402
from bench.soak_faults import SERVER_ENV, FaultPhase, disk_that_fills  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "demo" / "bundle"


def settled_jobs(base: str, timeout: float = 60) -> list[dict]:
    """Every adaptation job, once none is queued or running (or after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = httpx.get(f"{base}/adapt", timeout=30).json()["jobs"]
        if all(j["state"] not in ("queued", "running") for j in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.2)


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, base: str, tasks: list[str], seconds: float, seed: int):
        self.base, self.tasks, self.deadline = base, tasks, time.monotonic() + seconds
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.rng = random.Random(seed)
        self.adapted = 0

    def request(self) -> tuple[str, str, dict | None]:
        kind = self.rng.choices(["generate", "score", "tasks", "adapt"], weights=[60, 25, 14, 1])[0]
        task = self.rng.choice(self.tasks)
        text = "".join(self.rng.choices("abcdefghijklmnop", k=self.rng.randint(3, 8)))
        if kind == "generate":
            return kind, "/generate", {"task": task, "inputs": text, "max_new_tokens": 16}
        if kind == "score":
            return kind, "/score", {"task": task, "inputs": text, "choices": [text[::-1], text.upper()]}
        if kind == "tasks":
            return kind, "/tasks", None
        self.adapted += 1
        shots = [{"input": text + str(i), "target": (text + str(i))[::-1]} for i in range(8)]
        return kind, "/adapt", {"task": f"soak-{self.adapted}", "examples": shots, "steps": 5}

    async def client(self, http: httpx.AsyncClient) -> None:
        while time.monotonic() < self.deadline:
            kind, path, body = self.request()
            start = time.perf_counter()
            try:
                response = await (http.get(path) if body is None else http.post(path, json=body))
                ok = response.status_code < 300
                detail = f"{kind} {response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                ok, detail = False, f"{kind} {type(exc).__name__}: {exc}"
            self.latencies.append(time.perf_counter() - start)
            self.counts[kind] += 1
            if not ok:
                self.errors.append(detail)

    async def run(self, clients: int, faults: FaultPhase) -> None:
        limits = httpx.Limits(max_connections=clients + 8)
        async with httpx.AsyncClient(base_url=self.base, timeout=120, limits=limits) as http:
            await asyncio.gather(faults.run(self.deadline), *(self.client(http) for _ in range(clients)))


def both(first: Future, second: Future) -> tuple[subprocess.Popen, subprocess.Popen]:
    """Both servers once started; if one could not start, the other is stopped."""
    try:
        return first.result(), second.result()
    except BaseException:
        for started in (first, second):
            if started.exception() is None:
                started.result().kill()
        raise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--model", type=Path, default=DEMO / "model")
    parser.add_argument("--inventory", type=Path, default=DEMO / "inventory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as adapted, tempfile.TemporaryDirectory() as spare, \
            disk_that_fills(Path(spare)) as disk, ThreadPoolExecutor(2) as starting:
        port, faults_port = free_port(), free_port()
        soaked = starting.submit(start_server, args.model, args.inventory, Path(adapted), port, None,
                                 extra_env={"MHR_ADAPT_MAX_QUEUED": "1000", "MHR_MAX_BATCH_SIZE": "32"})
        faulty = starting.submit(start_server, args.model, args.inventory, disk.folder, faults_port, None,
                                 extra_env=SERVER_ENV, max_file_bytes=disk.max_file_bytes)
        proc, faults_proc = both(soaked, faulty)
        base, faults_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{faults_port}"
        try:
            tasks = [t["name"] for t in httpx.get(f"{base}/tasks").json()["tasks"]]
            soak = Soak(base, tasks, args.seconds, seed=0)
            pretrained = [t["name"] for t in httpx.get(f"{base}/tasks").json()["tasks"] if t["kind"] == "pretrained"]
            faults = FaultPhase(faults_base, disk, pretrained)
            start = time.monotonic()
            asyncio.run(soak.run(args.clients, faults))
            elapsed = time.monotonic() - start
            rss = peak_rss_mb(proc.pid)
            all_jobs = settled_jobs(base)
            jobs = Counter(j["state"] for j in all_jobs)
        finally:
            for server in (proc, faults_proc):
                server.terminate()
                server.wait(timeout=60)
    lat = sorted(soak.latencies)
    result = {
        "clients": args.clients, "seconds": round(elapsed, 1), "requests": sum(soak.counts.values()),
        "by_kind": dict(soak.counts), "errors": len(soak.errors), "first_errors": soak.errors[:5],
        "requests_per_s": round(len(lat) / elapsed, 1), "p50_ms": round(1e3 * statistics.median(lat), 1),
        "p99_ms": round(1e3 * lat[int(0.99 * (len(lat) - 1))], 1), "server_peak_rss_mb": round(rss, 1),
        "adapt_jobs": dict(jobs),
        "failed_jobs": [{"task": j["task"], "error": j["error"]} for j in all_jobs if j["state"] == "failed"][:5],
        **faults.result(),
    }
    print(json.dumps(result, indent=1))
    sys.exit(1 if soak.errors or jobs["failed"] or not faults.passed() else 0)


if __name__ == "__main__":
    main()
