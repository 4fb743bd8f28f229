"""Few-shot adaptation quality on the demo bundle's held-out tasks (new compositions of seen skills, absent from
the backbone's curriculum).

For each held-out task: 32 training shots, evaluation on fresh inputs (exact match, greedy).
Methods: MHR-z (routing logits only), Poly-z (one logit vector per layer), MHR-μ (the averaged LoRA
trained), zero-shot μ (no training), retrieve (no training: the best mix of the training tasks by their loss on
the shots), and MHR-z for 50 steps from uniform routing (cold) and from the retrieved mix (warm). Also seconds per
task and trainable parameters, and the p50 latency of /generate over HTTP while an adaptation job runs, relative
to idle. Prints one JSON object.

    .venv/bin/python bench/adapt_quality.py [--quick] [--steps N] [--skip-latency]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapter_store import AdapterCache, AdapterStore  # noqa: E402
from bench.serving_http import free_port, start_server  # noqa: E402
from demo.tasks import HELDOUT_TASKS, examples  # noqa: E402
from server.adapt import METHODS, Example, TrainConfig  # noqa: E402
from server.adapt.retrieve import retrieve  # noqa: E402
from server.adapt.trainer import train  # noqa: E402
from server.engine import Engine, GenerateRow, SamplingParams, load_model  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "demo" / "bundle"
SHOTS, EVAL = 32, 50


def exact_match(engine: Engine, adapter, pairs: list[tuple[str, str]]) -> float:
    params = SamplingParams(max_new_tokens=32)
    outs = engine.generate_with([adapter] * len(pairs), [GenerateRow("", x, params) for x, _ in pairs])
    return sum(o.text == y for o, (_, y) in zip(outs, pairs, strict=True)) / len(pairs)


def shots_of(task: str) -> list[Example]:
    return [Example(x, y) for x, y in examples(task, SHOTS, seed=1)]


def adapt_one(engine: Engine, method: str, task: str, steps: int, warm: bool = False) -> tuple[float, float, int]:
    """(exact match on fresh inputs, seconds, trainable parameters) for one held-out task; warm: start from the
    retrieved mix (its retrieval counted in the seconds)."""
    shots = shots_of(task)
    trainer = METHODS[method](engine.store)
    config = TrainConfig(steps=steps, learning_rate=trainer.default_learning_rate, batch_size=16, seed=0,
                         validation_fraction=0.0, max_seconds=600)
    start = time.perf_counter()
    if warm:
        trainer.start_from(engine.store.skill_weights(retrieve(engine, shots, k=3).mix))
    train(engine, trainer, shots, config, cancelled=lambda: False, on_progress=lambda p: None)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        score = exact_match(engine, trainer.adapter(), examples(task, EVAL, seed=2))
    return score, seconds, trainer.trainable_parameters


def quality(tasks: list[str], steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = AdapterStore.open(DEMO / "inventory", Path(tmp))
        engine = Engine(load_model(DEMO / "model", device="cpu"), store, AdapterCache(2**28))
        mu = engine.adapter("__mu__")
        out = {"heldout_tasks": tasks, "shots": SHOTS, "eval_inputs": EVAL, "steps": steps,
               "heldout_mu_exact_match": round(statistics.mean(
                   exact_match(engine, mu, examples(t, EVAL, seed=2)) for t in tasks), 3)}
        runs = {method.replace("-", "_"): [adapt_one(engine, method, task, steps) for task in tasks]
                for method in ("mhr-z", "poly-z", "mhr-mu")}
        runs["retrieve"] = [retrieve_one(engine, task) for task in tasks]
        runs["mhr_z_50_steps_cold"] = [adapt_one(engine, "mhr-z", task, 50) for task in tasks]
        runs["mhr_z_50_steps_from_retrieve"] = [adapt_one(engine, "mhr-z", task, 50, warm=True) for task in tasks]
        for key, results in runs.items():
            out[f"heldout_{key}_exact_match"] = round(statistics.mean(r[0] for r in results), 3)
            out[f"per_task_{key}"] = {t: round(r[0], 2) for t, r in zip(tasks, results, strict=True)}
            out[f"seconds_per_task_{key}"] = round(statistics.mean(r[1] for r in results), 2)
            out[f"trainable_parameters_{key}"] = results[0][2]
    return out


def retrieve_one(engine: Engine, task: str) -> tuple[float, float, int]:
    """Retrieval (no training): exact match of the retrieved mix, seconds, and 0 trainable parameters."""
    start = time.perf_counter()
    found = retrieve(engine, shots_of(task), k=3)
    seconds = time.perf_counter() - start
    pairs = examples(task, EVAL, seed=2)
    outs = engine.generate([GenerateRow(found.mix, x, SamplingParams(max_new_tokens=32)) for x, _ in pairs])
    return sum(o.text == y for o, (_, y) in zip(outs, pairs, strict=True)) / len(pairs), seconds, 0


def p50_ms(url: str, task: str, n: int) -> float:
    times = []
    with httpx.Client(timeout=120) as http:
        for i in range(n):
            start = time.perf_counter()
            http.post(url, json={"task": task, "inputs": f"abcde{i % 7}", "max_new_tokens": 16}).raise_for_status()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def latency_during_adapt(n: int, threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_server(DEMO / "model", DEMO / "inventory", Path(tmp), port, threads)
        base = f"http://127.0.0.1:{port}"
        try:
            task = next(t["name"] for t in httpx.get(f"{base}/tasks").json()["tasks"] if t["kind"] == "pretrained")
            p50_ms(f"{base}/generate", task, 3)  # warm-up
            idle = p50_ms(f"{base}/generate", task, n)
            shots = [{"input": x, "target": y} for x, y in examples(HELDOUT_TASKS[0], SHOTS, seed=1)]
            job = httpx.post(f"{base}/adapt", json={"task": "bench-job", "examples": shots, "steps": 2000}).json()
            while httpx.get(f"{base}/adapt/{job['id']}").json()["state"] != "running":
                time.sleep(0.05)
            busy = p50_ms(f"{base}/generate", task, n)
            still_running = httpx.get(f"{base}/adapt/{job['id']}").json()["state"] == "running"
            httpx.delete(f"{base}/adapt/{job['id']}")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return {"generate_p50_ms_idle": round(idle, 1), "generate_p50_ms_during_adapt": round(busy, 1),
            "generate_p50_ratio_during_adapt": round(busy / idle, 3), "adapt_job_ran_throughout": still_running}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="3 held-out tasks, fewer latency samples")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = HELDOUT_TASKS[:3] if args.quick else HELDOUT_TASKS
    result = {"threads": torch.get_num_threads(), **quality(tasks, args.steps or (100 if args.quick else 200))}
    if not args.skip_latency:
        result.update(latency_during_adapt(20 if args.quick else 60, args.threads))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
