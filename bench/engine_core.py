"""The engine core in-process: what the KV pool, the prefix cache and preemption buy, and what a decoding step
costs over the model's own forward. Prints one JSON object.

    attention_padding_share        mixed lengths (max_new_tokens uniform 8..128, 32 rows through 16 slots): positions
                                   read that are padding / all positions read, ours (decoding groups of rows of near
                                   length, at most 5 % padding each) and what a right-aligned dense cache (the
                                   previous engine) reads on the same steps
    prefix_shared_ttft_p50_ratio   64 requests of one task sharing a 512-token prefix, submitted together: time to
                                   first token p50 with the prefix cache off / on (a random Llama, 4 layers, d 256)
    step_overhead_vs_bare          one decoding step of 16 rows (16 distinct tasks) on a tiny Llama (d 64, 2 layers:
                                   compute ≈ 0): ours / a bare forward of the same model with a StaticCache
                                   (step_overhead_base_vs_bare: the same with 16 `__base__` rows, no adapter)
    preempted_requests_failed      32 requests of 64 tokens into a pool of 20 blocks: failures (and preemptions)
Run alone on the machine: `.venv/bin/python bench/engine_core.py` (`--quick`: fewer repetitions). On a GPU
(bench/gpu.sh): `--device cuda --only step --static-step cuda-graphs` times the step with each bucket captured;
`--profile K` adds what each step launches (operators, kernels, the K costliest: step_profile.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter_store import AdapterCache, AdapterStore  # noqa: E402
from bench.step_profile import profile_steps  # noqa: E402
from server.engine import (  # noqa: E402
    Engine,
    GenerateRow,
    SamplingParams,
    load_model,
    paged_attention,  # noqa: E402
)
from server.torch_threads import run_in_own_thread  # noqa: E402
from tests.factories import make_inventory, printable_only, save_bundle  # noqa: E402

DEVICE = "cpu"  # --device
STATIC_STEP: str | None = None  # --static-step: the engines' decoding step (None: paged)
PROFILE_TOP = 0  # --profile K: after timing the steps, profile them and report the K costliest operators or kernels
PROFILE_STEPS = 20
ROUNDS = 5  # the step's timing alternates between ours and the bare forward this many times


def engine_for(folder: Path, **options) -> Engine:
    """Built in a thread that ends, so that the engine's loop keeps the only OpenMP team (server/torch_threads.py);
    this thread only submits and waits."""
    def build() -> Engine:
        loaded = load_model(folder / "model", device=DEVICE)
        return Engine(loaded, AdapterStore.open(folder / "inventory"),
                      AdapterCache(10**9, loaded.device, loaded.dtype), static_step=STATIC_STEP, **options)

    return run_in_own_thread(build)


def padding_share(folder: Path, rows: int) -> dict:
    """Positions each step's attention reads, at the first decoder layer's self-attention: ours (a prefill reads
    each row's own runs; a decoding step reads each length group as wide as its longest row, at most 5 % padding,
    and rows alone their own runs) and what a dense right-aligned cache (the previous engine) reads on the same
    steps (every row as wide as the widest)."""
    engine = engine_for(folder, max_batch_size=16)
    real, read, dense = [0], [0], [0]
    original = paged_attention._attention

    def counting(module, query, *args, **kwargs):
        step = paged_attention.current()
        if step is not None and module.layer_idx == 0 and not module._mhr_cross:
            real[0] += sum(step.lengths)
            dense[0] += len(step.lengths) * max(step.lengths)
            if query.shape[2] == 1:
                together, alone = step.groups(False)
                read[0] += sum(g.width * len(g.rows) for g in together) + sum(step.lengths[r] for r in alone)
            else:
                read[0] += sum(step.lengths)
        return original(module, query, *args, **kwargs)

    paged_attention.AttentionInterface.register(paged_attention.NAME, counting)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 129, (rows,), generator=gen).tolist()
    engine.generate([GenerateRow(f"task-{i % 3}", f"input {i} " * (1 + i % 4), SamplingParams(
        max_new_tokens=n, ignore_eos=True)) for i, n in enumerate(lengths)])
    paged_attention.AttentionInterface.register(paged_attention.NAME, original)
    engine.close()
    return {"attention_padding_share": round(1 - real[0] / read[0], 4),
            "attention_padding_share_dense_cache": round(1 - real[0] / dense[0], 4)}


def prefix_ttft(folder: Path, requests: int) -> dict:
    prefix = "".join(chr(97 + (i * 7) % 26) for i in range(511))  # 511 bytes + BOS-free ByT5: 512 tokens with EOS
    out = {}
    for cache in (False, True):
        engine = engine_for(folder, max_batch_size=16, max_batch_tokens=65536, prefix_cache=cache)
        engine.generate([GenerateRow("task-0", prefix + " warm", SamplingParams(max_new_tokens=2))])
        firsts: list[float] = []
        lock = threading.Lock()
        start = time.perf_counter()
        jobs = []
        for i in range(requests):
            done = [False]

            def on_text(_piece, done=done, firsts=firsts, lock=lock, start=start):
                if not done[0]:
                    done[0] = True
                    with lock:
                        firsts.append(time.perf_counter() - start)

            row = GenerateRow("task-0", prefix + f" q{i}", SamplingParams(max_new_tokens=4, ignore_eos=True),
                              on_text=on_text)
            jobs.append(engine.submit_generate([row]))
        for job in jobs:
            job.future.result(timeout=600)
        out["on" if cache else "off"] = statistics.median(firsts)
        engine.close()
    return {"prefix_shared_ttft_p50_ms_off": round(1e3 * out["off"], 1),
            "prefix_shared_ttft_p50_ms_on": round(1e3 * out["on"], 1),
            "prefix_shared_ttft_p50_ratio": round(out["off"] / out["on"], 2)}


def step_overhead(folder: Path, reps: int) -> dict:
    """Both steps on the serving loop's thread, the only one left with an OpenMP team (the models are built in threads
    that end: a thread's team runs slower while another thread's is alive), so the bare forward is timed where ours
    is; in alternating rounds, so that a drift of the machine's speed hits both alike."""
    bare = run_in_own_thread(_bare_step, folder)
    engine = engine_for(folder, max_batch_size=16)
    profiles: dict = {}
    ours, bare_16 = _our_step(engine, reps, [f"task-{i}" for i in range(16)], bare, profiles, "ours_16_tasks")
    ours_base, bare_base = _our_step(engine, reps, ["__base__"] * 16, bare, profiles, "ours_base")
    engine.close()
    if PROFILE_TOP:
        profiles["bare"] = run_in_own_thread(profile_steps, bare, PROFILE_STEPS, PROFILE_TOP, DEVICE)
    out = {"step_ms_ours": round(ours * 1e3, 3), "step_ms_ours_base": round(ours_base * 1e3, 3),
           "step_ms_bare": round(statistics.median([bare_16, bare_base]) * 1e3, 3),
           "step_overhead_vs_bare": round(ours / bare_16, 2),
           "step_overhead_base_vs_bare": round(ours_base / bare_base, 2)}
    if profiles:
        out["step_profile"] = profiles
    return out


def _bare_step(folder: Path):
    """One decoding step of 16 rows of the plain transformers model with a static cache."""
    from transformers import StaticCache

    model = load_model(folder / "model", device=DEVICE).model  # the plain transformers model, no wrapped layers
    cache = StaticCache(config=model.config, max_cache_len=256)
    ids = torch.zeros((16, 1), dtype=torch.long, device=DEVICE)
    position = [8]

    def bare() -> None:
        with torch.inference_mode():
            logits = model(input_ids=ids, cache=cache, use_cache=True,
                           cache_position=torch.tensor([position[0]], device=DEVICE),
                           position_ids=torch.full((16, 1), position[0], device=DEVICE)).logits
            logits[:, -1].argmax(-1).tolist()  # the host reads the step's tokens, as the serving loop does
        position[0] += 1
        if position[0] >= 200:  # the static cache is full: start it over (a median ignores this step)
            with torch.inference_mode():
                cache.reset()
            position[0] = 8

    return bare


def _our_step(engine: Engine, reps: int, tasks: list[str], bare, profiles: dict, name: str) -> tuple[float, float]:
    """Median times of the serving loop's decoding step of 16 rows of these tasks and of the bare step, both on the
    loop's thread, in ROUNDS alternating rounds while the rows stay in the batch. With --profile, what each of our
    steps launches goes into profiles[name] (step_profile.py)."""
    batch = engine.loop.batch
    rows = [GenerateRow(task, f"row {i}", SamplingParams(max_new_tokens=10**4, ignore_eos=True))
            for i, task in enumerate(tasks)]
    job = engine.submit_generate(rows)
    while len(batch) < len(rows):
        time.sleep(0.001)
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(ROUNDS):
        ours += engine.loop.call(lambda: _step_times(batch.step, max(reps // ROUNDS, 1)))
        theirs += engine.loop.call(lambda: _step_times(bare, max(reps // ROUNDS, 1)))
    if PROFILE_TOP:
        profiles[name] = engine.loop.call(lambda: profile_steps(batch.step, PROFILE_STEPS, PROFILE_TOP, DEVICE))
    if job.future.done() or len(batch) < len(rows):  # a failed step leaves an empty batch, timed at ~0
        raise RuntimeError(f"the rows did not stay in the batch: {job.future.exception() if job.future.done() else ''}")
    job.cancel()
    while len(batch):
        time.sleep(0.001)
    return statistics.median(ours), statistics.median(theirs)


def _step_times(step, reps: int) -> list[float]:
    for _ in range(5):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def small_pool(folder: Path) -> dict:
    engine = engine_for(folder, max_batch_size=16, max_batch_tokens=16 * 18)  # 20 blocks of 16
    jobs = [engine.submit_generate([GenerateRow(f"task-{i % 3}", f"long request {i}", SamplingParams(
        max_new_tokens=64, ignore_eos=True))]) for i in range(32)]
    failed = 0
    for job in jobs:
        try:
            assert job.future.result(timeout=600)[0].completion_tokens == 64
        except Exception:  # noqa: BLE001 - counted, that is the point
            failed += 1
    out = {"preempted_requests_failed": failed, "preempted_rows": engine.loop.batch.preemptions}
    engine.close()
    return out


def tiny_llama_bundle(folder: Path, hidden: int, layers: int, heads: int) -> Path:
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = printable_only(LlamaForCausalLM(config).eval())
    model.save_pretrained(folder / "model")
    ByT5Tokenizer(extra_ids=0).save_pretrained(folder / "model")
    make_inventory(model, folder / "inventory", task_type="CAUSAL_LM", n_tasks=16, n_skills=8, n_splits=4, r=8,
                   targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda")
    parser.add_argument("--static-step", choices=["eager", "cuda-graphs"], help="the static-shaped decoding step "
                        "(default: the paged step)")
    parser.add_argument("--only", choices=["step"], help="only step_overhead_vs_bare")
    parser.add_argument("--profile", type=int, default=0, metavar="K", help="also profile the steps (after timing "
                        "them) and report operators and kernels per step and the K costliest (step_profile.py)")
    args = parser.parse_args()
    global DEVICE, STATIC_STEP, PROFILE_TOP
    DEVICE, STATIC_STEP, PROFILE_TOP = args.device, args.static_step, args.profile
    torch.set_num_threads(args.threads)
    out: dict = {"threads": args.threads, "device": args.device, "static_step": args.static_step}
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only == "step":
            tiny = run_in_own_thread(tiny_llama_bundle, Path(tmp) / "llama-tiny", 64, 2, 4)
            out.update(step_overhead(tiny, 50 if args.quick else 300))
            print(json.dumps(out, indent=1))
            return
        # the step first: how fast a thread's OpenMP team runs depends on which other threads have teams, and the
        # parts below leave more of them (measured: the bare step 1.0 ms first, 2.1 ms last)
        tiny = run_in_own_thread(tiny_llama_bundle, Path(tmp) / "llama-tiny", 64, 2, 4)
        out.update(step_overhead(tiny, 50 if args.quick else 300))
        t5 = Path(tmp) / "t5"
        run_in_own_thread(save_bundle, t5, "t5", sharp=False, printable=True)
        out.update(padding_share(t5, 32 if args.quick else 64))
        out.update(small_pool(t5))
        mid = run_in_own_thread(tiny_llama_bundle, Path(tmp) / "llama-mid", 256, 4, 8)
        out.update(prefix_ttft(mid, 16 if args.quick else 64))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
