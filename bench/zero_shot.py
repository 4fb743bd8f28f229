"""Zero-shot quality and speed of Arrow (routing per token, no task name, no examples) on the demo bundle.

Rows (exact match, greedy, fresh inputs as bench/adapt_quality.py draws them):
    heldout_zero_shot_exact_match[variant]       the 8 held-out tasks, no examples          vs μ (__mu__)
    train_tasks_zero_shot_exact_match[variant]   the 24 training tasks with their names withheld
                                                 vs the routed task (its name given) and μ
    *_zero_shot_bound                            what no zero-shot system can beat here: demo inputs never name
                                                 the task (per input, the largest share of tasks agreeing)
    prefixed.*                                   the same with the backbone's instruction prefix in the input
    zero_shot_tokens_per_s_vs_routed             16 rows of 32 new tokens: Arrow over skills (top_k 4) against
                                                 one routed task (merged weights) and 16 different routed tasks
                                                 (also Arrow routed once per request: ..._prompt)
    prompt_route_identifies_task                 Arrow over tasks routed once from the prompt (all kept): how often
                                                 the task weighted most (averaged over layers) is the input's own
                                                 training task, plain and prefixed (chance: 1/24)
Variants: over skills / over tasks, top_k 1 / 2 / 4 / all, temperature 1 (and a few others), per token and once per
request from the prompt (granularity "prompt"). Every request runs through the engine's serving loop, as over HTTP.
Prints one JSON object.

    .venv/bin/python bench/zero_shot.py [--quick] [--speed-only] [--variant tasks:all:100[:prompt] ...]
                                        [--n-heldout 50] [--n-train 20] [--threads 1]
                                        [--bundle demo/bundle] [--prefixed-only] [--no-speed]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapter_store import AdapterCache, AdapterStore, TaskAdapter  # noqa: E402
from adapter_store.arrow import ArrowSpec  # noqa: E402
from demo.tasks import HELDOUT_TASKS, TRAIN_TASKS, apply, examples, random_input, with_prefix  # noqa: E402
from server.engine import Engine, GenerateRow, SamplingParams, load_model  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "demo" / "bundle"
EVAL_SEED = 2  # as bench/adapt_quality.py: never the build's training stream
GREEDY = SamplingParams(max_new_tokens=32)

VARIANTS: list[ArrowSpec] = [
    *(ArrowSpec("skills", k, 1.0) for k in (1, 2, 4, None)),
    *(ArrowSpec("tasks", k, 1.0) for k in (1, 2, 4, None)),
    ArrowSpec("skills", None, 10.0), ArrowSpec("skills", 2, 0.1),
    ArrowSpec("tasks", None, 10.0), ArrowSpec("tasks", 4, 0.1),
    *(ArrowSpec("skills", k, 1.0, "prompt") for k in (1, 2, None)),
    *(ArrowSpec("tasks", k, 1.0, "prompt") for k in (1, 4, None)),
    ArrowSpec("tasks", None, 0.1, "prompt"), ArrowSpec("tasks", None, 10.0, "prompt"),
]
QUICK_VARIANTS = [ArrowSpec("skills", 2, 1.0), ArrowSpec("tasks", 4, 1.0), ArrowSpec("skills", 2, 1.0, "prompt"),
                  ArrowSpec("tasks", 1, 1.0, "prompt")]


def exact_match(engine: Engine, ref, tasks: list[str], n: int, *, prefixed: bool = False
                ) -> tuple[float, dict[str, float]]:
    """Mean exact match over the tasks (n fresh inputs each), and per task; `ref` is the same for every row
    (a task name, an ArrowSpec, a TaskAdapter) or None: each task's own name. prefixed: the input carries the
    backbone's instruction prefix (the task's skill codes, demo.tasks.with_prefix)."""
    pairs = [(task, with_prefix(task, x) if prefixed else x, y) for task in tasks
             for x, y in examples(task, n, seed=EVAL_SEED)]
    if isinstance(ref, TaskAdapter):
        outs = engine.generate_with([ref] * len(pairs), [GenerateRow("", x, GREEDY) for _, x, _ in pairs])
    else:
        outs = engine.generate([GenerateRow(task if ref is None else ref, x, GREEDY) for task, x, _ in pairs])
    per_task: dict[str, list[bool]] = {}
    for (task, _, y), out in zip(pairs, outs, strict=True):
        per_task.setdefault(task, []).append(out.text == y)
    scores = {task: sum(hits) / len(hits) for task, hits in per_task.items()}
    return statistics.mean(scores.values()), scores


def zero_shot_bound(tasks: list[str], n: int = 2000) -> float:
    """The best exact match any zero-shot system can reach when the input does not name the task (demo inputs
    are drawn alike for every task): per input, the largest share of the tasks that agree on one output."""
    rng = random.Random(f"bound|{EVAL_SEED}")
    total = 0.0
    for _ in range(n):
        x = random_input(rng)
        total += max(Counter(apply(task, x) for task in tasks).values()) / len(tasks)
    return total / n


def variant_rows(engine: Engine, variants: list[ArrowSpec], n_heldout: int, n_train: int, *, prefixed: bool
                 ) -> dict:
    """Each variant's exact match on the held-out tasks (and per task) and on the training tasks, names withheld."""
    heldout, train, per_task = {}, {}, {}
    for spec in variants:
        score, tasks = exact_match(engine, spec, HELDOUT_TASKS, n_heldout, prefixed=prefixed)
        heldout[spec.name] = round(score, 3)
        per_task[spec.name] = {t: round(s, 2) for t, s in tasks.items()}
        train[spec.name] = round(exact_match(engine, spec, TRAIN_TASKS, n_train, prefixed=prefixed)[0], 3)
    return {"heldout_zero_shot_exact_match": heldout, "train_tasks_zero_shot_exact_match": train,
            "heldout_per_task": per_task}


def tokens_per_s(engine: Engine, refs: list, repeats: int) -> float:
    """Median tokens per second of 16 rows × 32 new tokens (end of sequence ignored: equal work)."""
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    rates = []
    for i in range(repeats):
        rows = [GenerateRow(ref, f"abcdef{(i + j) % 9}", params) for j, ref in enumerate(refs)]
        start = time.perf_counter()
        outs = engine.generate(rows)
        rates.append(sum(o.completion_tokens for o in outs) / (time.perf_counter() - start))
    return statistics.median(rates)


def run(n_heldout: int, n_train: int, variants: list[ArrowSpec], repeats: int, *, speed_only: bool = False,
        bundle: Path = DEMO, prefixed_only: bool = False, no_speed: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = AdapterStore.open(bundle / "inventory", Path(tmp))
        engine = Engine(load_model(bundle / "model", device="cpu"), store, AdapterCache(2**28))
        try:
            out: dict = {} if speed_only else quality(engine, n_heldout, n_train, variants, prefixed_only=prefixed_only)
            if not no_speed:
                out.update(speed(engine, repeats))
        finally:
            engine.close()
    return out


def quality(engine: Engine, n_heldout: int, n_train: int, variants: list[ArrowSpec], *,
            prefixed_only: bool = False) -> dict:
    out: dict = {"heldout_tasks": len(HELDOUT_TASKS), "train_tasks": len(TRAIN_TASKS),
                 "inputs_per_heldout_task": n_heldout, "inputs_per_train_task": n_train}
    started = time.perf_counter()
    out["heldout_mu_exact_match"] = round(exact_match(engine, "__mu__", HELDOUT_TASKS, n_heldout)[0], 3)
    out["train_tasks_mu_exact_match"] = round(exact_match(engine, "__mu__", TRAIN_TASKS, n_train)[0], 3)
    out["train_tasks_routed_exact_match"] = round(exact_match(engine, None, TRAIN_TASKS, n_train)[0], 3)
    out["heldout_zero_shot_bound"] = round(zero_shot_bound(HELDOUT_TASKS), 3)
    out["train_tasks_zero_shot_bound"] = round(zero_shot_bound(TRAIN_TASKS), 3)
    inputs = (False, True) if not prefixed_only else (True,)  # without / with the instruction prefix
    rows = {prefixed: variant_rows(engine, variants, n_heldout, n_train, prefixed=prefixed) for prefixed in inputs}
    if not prefixed_only:
        out.update(rows[False])
    # the same with the instruction prefix in the input (the demo's adapters were trained without it)
    bare = engine.arrow_adapter(ArrowSpec("skills", 1)).library.zero_adapter()  # the backbone alone
    out["prefixed"] = {
        "heldout_backbone_exact_match": round(exact_match(engine, bare, HELDOUT_TASKS, n_heldout,
                                                          prefixed=True)[0], 3),
        "train_tasks_backbone_exact_match": round(exact_match(engine, bare, TRAIN_TASKS, n_train,
                                                              prefixed=True)[0], 3),
        "heldout_mu_exact_match": round(exact_match(engine, "__mu__", HELDOUT_TASKS, n_heldout,
                                                    prefixed=True)[0], 3),
        "train_tasks_mu_exact_match": round(exact_match(engine, "__mu__", TRAIN_TASKS, n_train,
                                                        prefixed=True)[0], 3),
        "train_tasks_routed_exact_match": round(exact_match(engine, None, TRAIN_TASKS, n_train,
                                                            prefixed=True)[0], 3),
        **rows[True],
    }
    out["prompt_route_identifies_task"] = {
        "plain": round(identified(engine, n_train, prefixed=False), 3),
        "prefixed": round(identified(engine, n_train, prefixed=True), 3), "chance": round(1 / len(TRAIN_TASKS), 3)}
    out["quality_seconds"] = round(time.perf_counter() - started, 1)
    return out


def identified(engine: Engine, n: int, *, prefixed: bool) -> float:
    """Arrow over tasks, routed once from each training task's prompt (all kept): the share of inputs whose most
    weighted task (each layer's fixed mix averaged over the layers) is their own."""
    spec = ArrowSpec("tasks", None, 1.0, "prompt")
    pairs = [(task, with_prefix(task, x) if prefixed else x) for task in TRAIN_TASKS
             for x, _ in examples(task, n, seed=EVAL_SEED)]
    found = engine.explain_many(spec, [x for _, x in pairs])
    return statistics.mean(max(e.average, key=e.average.get) == task for (task, _), e in zip(pairs, found,
                                                                                             strict=True))


def speed(engine: Engine, repeats: int) -> dict:
    arrow = ArrowSpec("skills", 4, 1.0)
    rate_arrow = tokens_per_s(engine, [arrow] * 16, repeats)
    rate_prompt = tokens_per_s(engine, [ArrowSpec("skills", 4, 1.0, "prompt")] * 16, repeats)
    rate_one = tokens_per_s(engine, [TRAIN_TASKS[0]] * 16, repeats)
    rate_mixed = tokens_per_s(engine, TRAIN_TASKS[:16], repeats)
    rates = {"arrow_skills_top4": rate_arrow, "arrow_skills_top4_prompt": rate_prompt,
             "one_routed_task_merged": rate_one, "16_routed_tasks_rows": rate_mixed}
    return {"tokens_per_s": {name: round(rate, 1) for name, rate in rates.items()},
            "zero_shot_tokens_per_s_vs_routed": round(rate_arrow / rate_one, 3),
            "zero_shot_tokens_per_s_vs_routed_prompt": round(rate_prompt / rate_one, 3),
            "zero_shot_tokens_per_s_vs_16_routed_tasks": round(rate_arrow / rate_mixed, 3)}


def _variant(text: str) -> ArrowSpec:
    over, top_k, temperature, *granularity = text.split(":")
    return ArrowSpec(over, None if top_k == "all" else int(top_k), float(temperature), *granularity)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="3 variants, 10 inputs per task")
    parser.add_argument("--n-heldout", type=int, default=50)
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--speed-only", action="store_true", help="only the tokens/s rows")
    parser.add_argument("--bundle", type=Path, default=DEMO,
                        help="another bundle folder (model/, inventory/), e.g. demo.build --prefixed-inventory's")
    parser.add_argument("--prefixed-only", action="store_true", help="skip the per-variant rows without the prefix")
    parser.add_argument("--no-speed", action="store_true", help="skip the tokens/s rows")
    parser.add_argument("--variant", action="append", default=[], metavar="OVER:TOP_K:TEMPERATURE[:GRANULARITY]",
                        help="measure these variants instead (top_k 'all' for all), e.g. tasks:all:100:prompt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_heldout, n_train = (10, 10) if args.quick else (args.n_heldout, args.n_train)
    variants = QUICK_VARIANTS if args.quick else VARIANTS
    if args.variant:
        variants = [_variant(text) for text in args.variant]
    repeats = 3 if args.quick else args.repeats
    measured = run(n_heldout, n_train, variants, repeats, speed_only=args.speed_only, bundle=args.bundle,
                   prefixed_only=args.prefixed_only, no_speed=args.no_speed)
    result = {"threads": torch.get_num_threads(), **measured}
    if args.bundle != DEMO:
        result = {"bundle": str(args.bundle), **result}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
