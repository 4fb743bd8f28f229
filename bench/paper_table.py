"""Small-scale version of the paper's pre-training comparison (Caccia et al. 2023, Table: MHR > Poly > LoRA).

On the demo task family and the demo's frozen backbone (demo/bundle/model), at an equal adapter
parameter budget, pre-train on the training tasks (no instruction prefix) for the same steps and data:
  (a) one shared LoRA (no routing: it never sees which task a row belongs to),
  (b) Poly (H = 1), (c) MHR (H = 4 by default);
then report training-task exact match (greedy, fresh examples) and final training loss per method.

    HF_HUB_OFFLINE=1 python bench/paper_table.py [--quick] [--seeds 0 1] [--steps 500]

Prints a markdown table, then one JSON object (last line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft import LoraConfig  # noqa: E402

from demo.bundle import DEFAULT_BUNDLE, load_backbone  # noqa: E402
from demo.inventory import InventoryHparams, count_trainable, poly_config, train_adapters  # noqa: E402
from demo.metrics import mean, per_task_exact_match  # noqa: E402
from demo.tasks import TRAIN_TASKS  # noqa: E402

EVAL_SEED = 2000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps (< 5 min)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--heads", type=int, default=4, help="H of the MHR row")
    parser.add_argument("--n", type=int, default=30, help="evaluation examples per task")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.n = args.seeds[:1], 150, 20
    return args


def per_rank_params(backbone: torch.nn.Module, targets: list[str]) -> int:
    """Sum of (d_in + d_out) over the adapted linears: the parameter count of a rank-1 LoRA."""
    total = 0
    for name, module in backbone.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets:
            total += module.in_features + module.out_features
    return total


def method_configs(backbone: torch.nn.Module, hp: InventoryHparams, heads: int) -> dict:
    """Poly, MHR, and a shared LoRA whose rank matches MHR's trainable-parameter count (routers included)."""
    n_tasks = len(TRAIN_TASKS)
    mhr_params = hp.n_skills * hp.r * per_rank_params(backbone, hp.target_modules)
    n_linears = sum(1 for n, m in backbone.named_modules() if n.split(".")[-1] in hp.target_modules)
    mhr_params += n_linears * n_tasks * heads * hp.n_skills
    lora_rank = max(1, round(mhr_params / per_rank_params(backbone, hp.target_modules)))
    lora = LoraConfig(
        task_type="SEQ_2_SEQ_LM",
        r=lora_rank,
        lora_alpha=lora_rank / hp.r,  # LoRA scales x A B by alpha / rank: 1 / r here, exactly like Poly
        lora_dropout=0.0,
        target_modules=list(hp.target_modules),
    )
    return {
        "shared LoRA": lora,
        "Poly (H=1)": poly_config(InventoryHparams(**{**vars(hp), "n_splits": 1}), n_tasks),
        f"MHR (H={heads})": poly_config(InventoryHparams(**{**vars(hp), "n_splits": heads}), n_tasks),
    }


def run_method(backbone, config, hp: InventoryHparams, seed: int, n_eval: int, name: str) -> dict:
    model, result = train_adapters(backbone, config, TRAIN_TASKS, hp, seed, name=name)
    is_poly = not isinstance(config, LoraConfig)
    rows = list(range(len(TRAIN_TASKS))) if is_poly else None
    scores = per_task_exact_match(model, TRAIN_TASKS, n_eval, EVAL_SEED + seed, task_ids=rows)
    return {
        "exact_match": mean(scores),
        "final_loss": result.final_loss,
        "params": count_trainable(model),
        "seconds": result.seconds,
    }


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for method, results in runs.items():
        ems = [r["exact_match"] for r in results]
        losses = [r["final_loss"] for r in results]
        summary[method] = {
            "exact_match_mean": round(sum(ems) / len(ems), 4),
            "exact_match_per_seed": [round(x, 4) for x in ems],
            "final_loss_mean": round(sum(losses) / len(losses), 4),
            "trainable_params": results[0]["params"],
            "train_seconds_mean": round(sum(r["seconds"] for r in results) / len(results), 1),
        }
    return summary


def markdown(summary: dict[str, dict], seeds: list[int], steps: int) -> str:
    lines = [
        f"| method | trainable params | train-task exact match (mean over seeds {seeds}) | final loss |",
        "|---|---:|---:|---:|",
    ]
    for method, s in summary.items():
        per_seed = ", ".join(f"{x:.3f}" for x in s["exact_match_per_seed"])
        lines.append(
            f"| {method} | {s['trainable_params']:,} | {s['exact_match_mean']:.3f} ({per_seed}) "
            f"| {s['final_loss_mean']:.4f} |"
        )
    lines.append(f"\n{steps} steps per run, batch {InventoryHparams.batch_size}, same data stream per seed.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    torch.set_num_threads(1)  # 2 threads on a busy 2-core machine were up to 10x slower (spin-waits)
    start = time.monotonic()
    backbone, _ = load_backbone(args.bundle)
    for param in backbone.parameters():
        param.requires_grad_(False)
    hp = InventoryHparams(steps=args.steps, warmup_steps=min(100, args.steps // 10))
    configs = method_configs(backbone, hp, args.heads)
    runs: dict[str, list[dict]] = {method: [] for method in configs}
    for seed in args.seeds:
        for method, config in configs.items():
            runs[method].append(run_method(backbone, config, hp, seed, args.n, name=f"{method} s{seed}"))
    summary = summarise(runs)
    print(markdown(summary, args.seeds, args.steps))
    report = {
        "seeds": args.seeds,
        "steps": args.steps,
        "eval_examples_per_task": args.n,
        "methods": summary,
        "seconds": round(time.monotonic() - start, 1),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
