"""The HTTP part of bench/serving.py: uvicorn in a subprocess on loopback, 1 client vs 32 concurrent."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, inventory: Path, adapted: Path, port: int, threads: int | None,
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "MHR_MODEL": str(model), "MHR_INVENTORY": str(inventory), "MHR_ADAPTED_DIR": str(adapted),
           "MHR_PORT": str(port), "MHR_DEVICE": "cpu", "MHR_MAX_BATCH_SIZE": "32", "MHR_MAX_BATCH_WAIT_MS": "5",
           "MHR_LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1"}
    if threads:
        env["MHR_THREADS"] = str(threads)
    env.update(extra_env or {})
    proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready in 120 s")


async def _clients(url: str, tasks: list[str], n_requests: int, concurrency: int, new_tokens: int) -> float:
    queue = list(range(n_requests))
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            i = queue.pop()
            body = {"task": tasks[i % len(tasks)], "inputs": f"input number {i:05d} abcdefgh",
                    "max_new_tokens": new_tokens}
            response = await http.post(url, json=body)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await client(http) if concurrency == 1 else None  # warm-up happens in the first call below otherwise
        queue[:] = list(range(n_requests))
        tokens = 0
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return tokens / (time.perf_counter() - start)


def http_throughput(model: Path, inventory: Path, adapted: Path, args) -> dict:
    port = free_port()
    proc = start_server(model, inventory, adapted, port, args.threads)
    try:
        url = f"http://127.0.0.1:{port}/generate"
        tasks = [t["name"] for t in httpx.get(f"http://127.0.0.1:{port}/tasks").json()["tasks"]
                 if t["kind"] == "pretrained"]
        one = asyncio.run(_clients(url, tasks, args.http_requests // 4, 1, args.new_tokens))
        many = asyncio.run(_clients(url, tasks, args.http_requests, 32, args.new_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"http_tokens_per_s_1_client": round(one, 1), "http_tokens_per_s_32_clients": round(many, 1),
            "ratio_32_clients_vs_1": round(many / one, 3)}
