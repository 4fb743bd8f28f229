"""Where head-of-line time goes: an 8-token request alone and behind 4 long generations, measured on the engine
in-process (no HTTP, one Python thread submitting) and through a server process (HTTP, SSE streams). Prints one
JSON object. (On an H200 this split found cuDNN attention's per-length plans: engine 11x, HTTP 8.4x; see
server/engine/paged_attention.py avoid_per_length_attention_plans.)

    .venv/bin/python bench/hol_engine.py [--device cuda] [--n 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.serving_http as http_bench  # noqa: E402
from adapter_store import AdapterCache, AdapterStore  # noqa: E402
from bench.serving import build_random_bundle  # noqa: E402
from server.engine import Engine, GenerateRow, SamplingParams, load_model  # noqa: E402


def engine_hol(folder: Path, device: str, n: int) -> dict:
    loaded = load_model(folder / "model", device=device)
    store = AdapterStore.open(folder / "inventory", folder / "adapted")
    engine = Engine(loaded, store, AdapterCache(2**30, loaded.device, loaded.dtype), max_batch_size=32)
    tasks = [t.name for t in store.tasks() if t.kind == "pretrained"]
    short = SamplingParams(max_new_tokens=8, ignore_eos=True)

    def short_p50_ms() -> float:
        times = []
        for i in range(n):
            start = time.perf_counter()
            engine.generate([GenerateRow(tasks[0], f"input number {i:05d} abcdefgh", short)])
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    short_p50_ms()  # warm-up
    alone = short_p50_ms()
    long = SamplingParams(max_new_tokens=600, ignore_eos=True)
    jobs = [engine.submit_generate([GenerateRow(tasks[k + 1], f"long {k}", long)]) for k in range(4)]
    time.sleep(0.5)
    busy = short_p50_ms()
    for job in jobs:
        job.future.result()
    engine.close()
    return {"engine_short_p50_ms_alone": round(alone, 1), "engine_short_p50_ms_behind_4": round(busy, 1),
            "engine_hol_ratio": round(busy / alone, 3)}


def http_hol(folder: Path, device: str, n: int) -> dict:
    with http_bench.served(folder / "model", folder / "inventory", folder / "adapted", None, device) as (base, tasks):
        return asyncio.run(http_bench._head_of_line(base, tasks, n))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    out = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_random_bundle(folder)
        out.update(engine_hol(folder, args.device, args.n))
        out.update({f"http_{k}": v for k, v in http_hol(folder, args.device, args.n).items()})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
