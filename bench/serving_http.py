"""The HTTP part of bench/serving.py: uvicorn in a subprocess on loopback.

    throughput          1 client vs 32 concurrent clients, fixed-length requests        ratio_32_clients_vs_1
                        (and how many rows joined per prefill forward: rows_per_joining_prefill_32_clients)
    head of line        8-token requests alone, then while 4 clients stream 256-token generations
                                                                                         hol_short_p50_ratio
    after adaptation    1 client just before and after an /adapt job and a /route/explain
                                                                          ratio_1_client_after_adapt_and_explain
    mixed lengths       64 clients share a fixed list of requests, max_new_tokens uniform in 8..256 (seeded); 8 of the
                        clients stream (time to first token)         mixed_length_tokens_per_s, ttft_*
                        (the request-level "static" scheduler it was compared with is gone: its last figures are
                        in the README)
Every generation produces exactly the tokens it asks for: ignore_eos, or min_new_tokens = max_new_tokens (the end of
sequence is never chosen, so every streamed token is text at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, inventory: Path, adapted: Path, port: int, threads: int | None,
                 extra_env: dict[str, str] | None = None, device: str = "cpu",
                 max_file_bytes: int | None = None) -> subprocess.Popen:
    """A server process, once it answers /readyz. max_file_bytes: the process may write no file larger (RLIMIT_FSIZE;
    Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""
    env = {**os.environ, "MHR_MODEL": str(model), "MHR_INVENTORY": str(inventory), "MHR_ADAPTED_DIR": str(adapted),
           "MHR_PORT": str(port), "MHR_DEVICE": device, "MHR_MAX_BATCH_SIZE": "32", "MHR_MAX_BATCH_WAIT_MS": "5",
           "MHR_LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1"}
    if threads:
        env["MHR_THREADS"] = str(threads)
    env.update(extra_env or {})
    limit = None if max_file_bytes is None else functools.partial(
        resource.setrlimit, resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=env, preexec_fn=limit)
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


@contextlib.contextmanager
def served(model: Path, inventory: Path, adapted: Path, threads: int | None, device: str = "cpu", **settings: str):
    """A server process for the block; yields its base URL and its pretrained task names."""
    port = free_port()
    proc = start_server(model, inventory, adapted, port, threads, extra_env=settings, device=device)
    base = f"http://127.0.0.1:{port}"
    try:
        tasks = [t["name"] for t in httpx.get(f"{base}/tasks").json()["tasks"] if t["kind"] == "pretrained"]
        yield base, tasks
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def body(task: str, i: int, new_tokens: int, **extra) -> dict:
    return {"task": task, "inputs": f"input number {i:05d} abcdefgh", "max_new_tokens": new_tokens,
            "ignore_eos": True, **extra}


async def _clients(base: str, tasks: list[str], n_requests: int, concurrency: int, new_tokens: int) -> float:
    queue = list(range(n_requests))
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            i = queue.pop()
            response = await http.post(f"{base}/generate", json=body(tasks[i % len(tasks)], i, new_tokens))
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        # an untimed pass of the same workload first: one-time costs are not throughput (a CUDA graph is captured per
        # new bucket of rows, and on an H200 the whole timed 32-client pass of --quick lasted under a second)
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        queue[:] = list(range(n_requests))
        tokens = 0
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return tokens / (time.perf_counter() - start)


async def _streamed(http: httpx.AsyncClient, base: str, payload: dict, on_text=lambda text: None,
                    on_first=lambda seconds: None) -> tuple[float | None, int]:
    """(seconds to the first text, completion tokens) of one streamed /generate; on_text sees each piece,
    on_first the seconds to the first one."""
    start, first = time.perf_counter(), None
    async with http.stream("POST", f"{base}/generate", json={**payload, "stream": True}) as response:
        response.raise_for_status()
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "done":
                    return first, data["usage"]["completion_tokens"]
                if event is None and data.get("text"):
                    if first is None:
                        first = time.perf_counter() - start
                        on_first(first)
                    on_text(data["text"])
                event = None
    raise RuntimeError("the stream ended without its done event")


async def _short_p50_ms(http: httpx.AsyncClient, base: str, task: str, n: int) -> float:
    times = []
    for i in range(n):
        start = time.perf_counter()
        (await http.post(f"{base}/generate", json=body(task, i, 8))).raise_for_status()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


async def _head_of_line(base: str, tasks: list[str], n: int) -> dict:
    """8-token requests alone, then while 4 clients keep streaming 256-token generations."""
    async with httpx.AsyncClient(timeout=300) as http:
        await _short_p50_ms(http, base, tasks[0], 3)  # warm-up
        alone = await _short_p50_ms(http, base, tasks[0], n)
        stop = asyncio.Event()

        async def streaming_client(k: int) -> None:
            i = 0
            while not stop.is_set():
                await _streamed(http, base, body(tasks[(k + 1) % len(tasks)], 1000 * k + i, 256))
                i += 1

        streams = [asyncio.ensure_future(streaming_client(k)) for k in range(4)]
        await asyncio.sleep(0.5)  # the long generations are decoding
        busy = await _short_p50_ms(http, base, tasks[0], n)
        stop.set()
        await asyncio.gather(*streams)
    return {"short_p50_ms_alone": round(alone, 1), "short_p50_ms_behind_4_streams": round(busy, 1),
            "hol_short_p50_ratio": round(busy / alone, 3)}


async def _after_adapt_and_explain(base: str, tasks: list[str], n_requests: int, new_tokens: int) -> dict:
    """1 client's tokens/s just before and after one /adapt job (mhr-z, 20 steps) and one /route/explain: the server
    must serve as fast after them (server/torch_threads.py; when they left torch's OpenMP team in a long-lived
    thread, the demo fell to 0.37x for the rest of the server's life)."""
    before = await _clients(base, tasks, n_requests, 1, new_tokens)
    examples = [{"input": word, "target": word[::-1]} for word in ("abc", "hello", "world", "skill", "route", "mix")]
    async with httpx.AsyncClient(base_url=base, timeout=300) as http:
        job = (await http.post("/adapt", json={"task": "bench-adapted", "examples": examples, "steps": 20,
                                              "overwrite": True})).raise_for_status().json()
        while (state := (await http.get(f"/adapt/{job['id']}")).json()["state"]) in ("queued", "running"):
            await asyncio.sleep(0.2)
        if state != "succeeded":  # else "after" would not be after an adaptation
            raise RuntimeError(f"the bench's /adapt job ended {state}")
        (await http.post("/route/explain", json={"task": {"route": "arrow", "over": "skills"}, "input": "hello"})
         ).raise_for_status()
    after = await _clients(base, tasks, n_requests, 1, new_tokens)
    return {"http_tokens_per_s_1_client_before_adapt": round(before, 1),
            "http_tokens_per_s_1_client_after_adapt_and_explain": round(after, 1),
            "ratio_1_client_after_adapt_and_explain": round(after / before, 3)}


async def _mixed_lengths(base: str, tasks: list[str], n_requests: int, seed: int = 0) -> dict:
    """64 clients take requests from one list (max_new_tokens uniform in 8..256, the same draws every run) until it
    is empty; tokens/s over the whole run. The first 8 clients stream, for the time to first token."""
    rng = random.Random(seed)
    work = [(i, rng.randint(8, 256)) for i in range(n_requests)][::-1]
    firsts: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient, streams: bool) -> None:
        nonlocal tokens
        while work:
            i, n = work.pop()
            payload = body(tasks[i % len(tasks)], i, n, min_new_tokens=n, ignore_eos=False)
            if streams:
                _, done = await _streamed(http, base, payload, on_first=firsts.append)
            else:
                response = await http.post(f"{base}/generate", json=payload)
                response.raise_for_status()
                done = response.json()["usage"]["completion_tokens"]
            tokens += done  # after the await: `tokens += await ...` would lose other clients' updates

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=72)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, k < 8) for k in range(64)))
        elapsed = time.perf_counter() - start
    firsts.sort()
    return {"tokens_per_s": round(tokens / elapsed, 1), "ttft_p50_ms": round(1e3 * statistics.median(firsts), 1),
            "ttft_p99_ms": round(1e3 * firsts[int(0.99 * (len(firsts) - 1))], 1)}


def loop_counters(base: str) -> dict[str, float]:
    """The server's joining prefills, rows they carried, decoding steps and loop seconds by phase so far, from its
    /metrics: {"prefills", "joined_rows", "steps", <phase>: seconds, ...}."""
    wanted = {"mhr_joining_prefills_total": "prefills", "mhr_joined_rows_total": "joined_rows",
              "mhr_batch_rows_count": "steps"}
    found = {}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.name in wanted:
                found[wanted[sample.name]] = sample.value
            elif sample.name == "mhr_loop_seconds_total":
                found[sample.labels["phase"]] = sample.value
    return found


def loop_report(before: dict[str, float], after: dict[str, float]) -> dict:
    """Between two loop_counters: rows per joining prefill, milliseconds per joining prefill (the loop's prefill
    phase) and per decoding step (its decode phase), and each phase's share of the loop's time."""
    moved = {name: after[name] - before[name] for name in after}
    prefills, rows, steps = moved.pop("prefills"), moved.pop("joined_rows"), moved.pop("steps")
    total = sum(moved.values()) or 1.0
    return {"rows_per_joining_prefill": round(rows / max(prefills, 1), 2),
            "ms_per_joining_prefill": round(1e3 * moved["prefill"] / max(prefills, 1), 2),
            "ms_per_decoding_step": round(1e3 * moved["decode"] / max(steps, 1), 3),
            "loop_share": {phase: round(seconds / total, 3) for phase, seconds in moved.items()}}


def http_throughput(model: Path, inventory: Path, adapted: Path, args) -> dict:
    out = {}
    with served(model, inventory, adapted, args.threads, args.device) as (base, tasks):
        one = asyncio.run(_clients(base, tasks, args.http_requests // 4, 1, args.new_tokens))
        before = loop_counters(base)
        many = asyncio.run(_clients(base, tasks, args.http_requests, 32, args.new_tokens))
        loop = loop_report(before, loop_counters(base))
        out.update(http_tokens_per_s_1_client=round(one, 1), http_tokens_per_s_32_clients=round(many, 1),
                   ratio_32_clients_vs_1=round(many / one, 3),
                   **{f"{key}_32_clients": value for key, value in loop.items()})
        out.update(asyncio.run(_head_of_line(base, tasks, args.hol_requests)))
        continuous = asyncio.run(_mixed_lengths(base, tasks, args.mixed_requests))
        out.update(asyncio.run(_after_adapt_and_explain(base, tasks, args.http_requests // 4, args.new_tokens)))
    out.update(mixed_length_tokens_per_s=continuous["tokens_per_s"], ttft_p50_ms=continuous["ttft_p50_ms"],
               ttft_p99_ms=continuous["ttft_p99_ms"])
    return out
