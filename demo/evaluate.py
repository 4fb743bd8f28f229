"""Evaluate the demo bundle with plain transformers + PEFT; prints one JSON object.

    HF_HUB_OFFLINE=1 python -m demo.evaluate [--bundle demo/bundle] [--n 50] [--seed 1000]

Metrics (greedy decoding, exact match on fresh examples drawn with ``--seed``, never the training seed):
- train_routed_exact_match: training tasks, each routed by its own tasks.json row, no prefix;
- train_mu_exact_match: the same tasks through the mu adapter (all routing logits 0: w = 1/K);
- heldout_mu_exact_match: held-out tasks through the mu adapter (the zero-shot baseline);
- no_adapter_exact_match: training tasks on the backbone with the adapter disabled, no prefix;
- backbone_prefixed_*: the backbone given its instruction prefix (what the adapters have to replace).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from demo.bundle import DEFAULT_BUNDLE, bundle_megabytes, load_inventory, load_task_rows
from demo.inventory import uniform_routing
from demo.metrics import mean, per_task_exact_match
from demo.tasks import HELDOUT_TASKS, TRAIN_TASKS

EVAL_SEED = 1000  # the build samples training data from its own seeded stream, not from examples()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--n", type=int, default=50, help="examples per task")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    return parser.parse_args(argv)


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {task: round(score, 3) for task, score in scores.items()}


def evaluate(bundle: Path, n: int, seed: int) -> dict:
    model = load_inventory(bundle)
    rows = load_task_rows(bundle)
    train_rows = [rows[task] for task in TRAIN_TASKS]
    routed = per_task_exact_match(model, TRAIN_TASKS, n, seed, task_ids=train_rows)
    with uniform_routing(model):
        train_mu = per_task_exact_match(model, TRAIN_TASKS, n, seed, task_ids=[0] * len(TRAIN_TASKS))
        heldout_mu = per_task_exact_match(model, HELDOUT_TASKS, n, seed, task_ids=[0] * len(HELDOUT_TASKS))
    with model.disable_adapter():
        bare = per_task_exact_match(model, TRAIN_TASKS, n, seed)
        prefixed_train = per_task_exact_match(model, TRAIN_TASKS, n, seed, prefixed=True)
        prefixed_heldout = per_task_exact_match(model, HELDOUT_TASKS, n, seed, prefixed=True)
    return {
        "train_routed_exact_match": round(mean(routed), 4),
        "train_mu_exact_match": round(mean(train_mu), 4),
        "heldout_mu_exact_match": round(mean(heldout_mu), 4),
        "no_adapter_exact_match": round(mean(bare), 4),
        "backbone_prefixed_train_exact_match": round(mean(prefixed_train), 4),
        "backbone_prefixed_heldout_exact_match": round(mean(prefixed_heldout), 4),
        "bundle_mb": round(bundle_megabytes(bundle), 2),
        "n_per_task": n,
        "eval_seed": seed,
        "per_task": {
            "train_routed": _rounded(routed),
            "train_mu": _rounded(train_mu),
            "heldout_mu": _rounded(heldout_mu),
        },
    }


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine were up to 10x slower (spin-waits)
    start = time.monotonic()
    result = evaluate(args.bundle, args.n, args.seed)
    result["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
