"""Load for bench/vs_vllm.py: OpenAI /v1/completions requests from concurrent clients, the same on both servers.

Every request is greedy (temperature 0) with ignore_eos, so it generates exactly max_tokens tokens on either server.
Each client streams its first request (time to first text chunk) and sends the rest without streaming; tokens are
the servers' usage counts (a streamed request: max_tokens, checked against its finish_reason).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass

import httpx

WORDS = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "vo", "ze", "qua", "pri", "ost", "el", "an", "dor"]


@dataclass(frozen=True)
class Request:
    model: str
    prompt: str
    max_tokens: int


def prompt_for(i: int, tag: str) -> str:
    return f"input number {i:05d} {tag} kalo mine dorshi"


def fixed_requests(models: list[str], n: int, max_tokens: int, tag: str) -> list[Request]:
    """n requests, round robin over `models`."""
    return [Request(models[i % len(models)], prompt_for(i, tag), max_tokens) for i in range(n)]


def mixed_requests(models: list[str], n: int, tag: str, seed: int = 0) -> list[Request]:
    """max_tokens uniform in 8..256, the same draws every run."""
    rng = random.Random(seed)
    return [Request(models[i % len(models)], prompt_for(i, tag), rng.randint(8, 256)) for i in range(n)]


def shared_prefix(tag: str, n_words: int = 245) -> str:
    """~512 tokens of made-up words (about 2 tokens per word with the bench tokenizer), different per tag."""
    rng = random.Random(tag)
    return " ".join(rng.choice(WORDS) + rng.choice(WORDS) + str(rng.randint(0, 9)) for _ in range(n_words))


def prefix_requests(model: str, n: int, max_tokens: int, tag: str) -> list[Request]:
    prefix = shared_prefix(tag)
    return [Request(model, f"{prefix} question {i:05d}", max_tokens) for i in range(n)]


def payload(request: Request, stream: bool) -> dict:
    """No stream_options: our server refuses include_usage (extra fields are 422), so a streamed request counts
    max_tokens on both sides."""
    return {"model": request.model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


async def streamed(http: httpx.AsyncClient, base: str, request: Request) -> tuple[float, int]:
    """(seconds to the first non-empty text chunk, completion tokens) of one streamed completion."""
    start, first, finish, usage = time.perf_counter(), None, None, None
    async with http.stream("POST", f"{base}/v1/completions", json=payload(request, True)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(f"stream error from {base}: {data['error']}")
            for choice in data.get("choices") or []:
                if choice.get("text") and first is None:
                    first = time.perf_counter() - start
                finish = choice.get("finish_reason") or finish
            usage = data.get("usage") or usage
    if first is None or finish != "length":
        raise RuntimeError(f"stream from {base} ended without text or early (finish_reason {finish})")
    return first, (usage or {}).get("completion_tokens", request.max_tokens)


async def completed(http: httpx.AsyncClient, base: str, request: Request) -> dict:
    response = await http.post(f"{base}/v1/completions", json=payload(request, False))
    if response.status_code != 200:
        raise RuntimeError(f"{base} answered {response.status_code} to {request.model!r}: {response.text[:300]}")
    return response.json()


async def run_load(base: str, requests: list[Request], concurrency: int = 16) -> dict:
    """All requests from `concurrency` clients sharing one queue; tokens/s over the whole run, TTFT p50 of the
    clients' first (streamed) requests."""
    work = list(reversed(requests))
    firsts: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        first_request = True
        while work:
            request = work.pop()
            if first_request:
                ttft, done = await streamed(http, base, request)
                firsts.append(ttft)
                first_request = False
            else:
                done = (await completed(http, base, request))["usage"]["completion_tokens"]
            tokens += done  # after the await: `tokens += await ...` would lose other clients' updates

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"tokens_per_s": round(tokens / elapsed, 1), "ttft_p50_ms": round(1e3 * statistics.median(firsts), 1),
            "tokens": tokens, "seconds": round(elapsed, 2)}


async def greedy_texts(base: str, requests: list[Request]) -> list[str]:
    async with httpx.AsyncClient(timeout=600) as http:
        answers = await asyncio.gather(*(completed(http, base, r) for r in requests))
    return [a["choices"][0]["text"] for a in answers]


async def answers_model(base: str, model: str) -> bool:
    """Does the server generate for this model name (a 1-token completion)?"""
    async with httpx.AsyncClient(timeout=120) as http:
        response = await http.post(f"{base}/v1/completions", json=payload(Request(model, "probe", 1), False))
    return response.status_code == 200
