"""Reference MHR-z check with plain PEFT: adapt held-out tasks from a few examples by routing only.

    HF_HUB_OFFLINE=1 python -m demo.fewshot [--bundle demo/bundle] [--tasks reverse-capfirst ...]
                                            [--shots 32] [--steps 100] [--lr 0.1]

Per held-out task: router row 0 of every layer is reset to 0 (uniform, the mu adapter), only the
routing logits train (Adam, lr 0.1 as in mttl), adapters and backbone stay frozen; then greedy exact
match on 50 fresh examples. Prints one JSON object. About 20-40 s per task on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from demo.batches import make_batch
from demo.bundle import DEFAULT_BUNDLE, load_inventory
from demo.inventory import routers
from demo.metrics import per_task_exact_match
from demo.tasks import HELDOUT_TASKS, examples

SHOT_SEED, EVAL_SEED = 5, 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--tasks", nargs="+", default=HELDOUT_TASKS)
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--n", type=int, default=50, help="evaluation examples per task")
    return parser.parse_args(argv)


def adapt_routing(model, task: str, shots: int, steps: int, lr: float) -> float:
    """Train router row 0 of every layer on ``shots`` examples of ``task``; returns the last loss."""
    logits = routers(model)  # each (n_tasks, H*K)
    with torch.no_grad():
        for param in logits:
            param[0].zero_()
    for param in model.parameters():
        param.requires_grad_(False)
    for param in logits:
        param.requires_grad_(True)
    train = examples(task, shots, seed=SHOT_SEED)
    batch = make_batch([x for x, _ in train], [y for _, y in train], [0] * shots)
    optimizer = torch.optim.Adam(logits, lr=lr)
    model.train()  # PEFT samples routing from RelaxedBernoulli in train mode, as in mttl's z-tuning
    for _ in range(steps):
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            labels=batch.labels,
            task_ids=batch.task_ids,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    model.eval()
    return out.loss.item()


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for task in args.tasks:
        torch.manual_seed(0)
        model = load_inventory(args.bundle)
        loss = adapt_routing(model, task, args.shots, args.steps, args.lr)
        score = per_task_exact_match(model, [task], args.n, EVAL_SEED, task_ids=[0])[task]
        results[task] = {"exact_match": round(score, 3), "final_loss": round(loss, 4)}
    mean_score = sum(r["exact_match"] for r in results.values()) / max(1, len(results))
    report = {"method": "MHR-z (routing logits only)", "shots": args.shots, "steps": args.steps, "lr": args.lr}
    print(json.dumps(report | {"mean_exact_match": round(mean_score, 4), "per_task": results}, indent=2))


if __name__ == "__main__":
    main()
