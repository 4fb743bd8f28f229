"""Short-budget probe of the backbone's single-skill share (how BackboneHparams.single_skill_share was chosen).

    HF_HUB_OFFLINE=1 python -m demo.probe_share --share 0.2 [--backbone-steps 3000] [--inventory-steps 600]

For one share: train a backbone on the curriculum (single skills + training compositions, prefixed),
an MHR inventory on it (no prefix), then measure the prefixed backbone, the routed training tasks and
MHR-z few-shot on the held-out tasks (demo.fewshot's recipe). Prints one JSON object. The budgets are
far below the real build's, so compare shares with each other, not with the bundle's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from demo.backbone import BackboneHparams, train_backbone
from demo.fewshot import EVAL_SEED, adapt_routing
from demo.inventory import InventoryHparams, poly_config, train_adapters
from demo.metrics import mean, per_task_exact_match
from demo.tasks import HELDOUT_TASKS, SKILLS, TRAIN_TASKS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--share", type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone-steps", type=int, default=3000)
    parser.add_argument("--inventory-steps", type=int, default=600)
    parser.add_argument("--n", type=int, default=30, help="evaluation examples per task")
    return parser.parse_args(argv)


def probe(args: argparse.Namespace) -> dict:
    start = time.monotonic()
    hp = BackboneHparams(steps=args.backbone_steps, single_skill_share=args.share)
    backbone, bb = train_backbone(hp, args.seed)
    singles = mean(per_task_exact_match(backbone, list(SKILLS), args.n, EVAL_SEED, prefixed=True))
    pairs = mean(per_task_exact_match(backbone, TRAIN_TASKS, args.n, EVAL_SEED, prefixed=True))
    unseen = mean(per_task_exact_match(backbone, HELDOUT_TASKS, args.n, EVAL_SEED, prefixed=True))
    for param in backbone.parameters():
        param.requires_grad_(False)
    inv_hp = InventoryHparams(steps=args.inventory_steps)
    inventory, inv = train_adapters(backbone, poly_config(inv_hp, len(TRAIN_TASKS)), TRAIN_TASKS, inv_hp, args.seed)
    routed = mean(per_task_exact_match(inventory, TRAIN_TASKS, args.n, EVAL_SEED, task_ids=list(range(24))))
    state = {k: v.detach().clone() for k, v in inventory.state_dict().items()}
    fewshot = {}
    for task in HELDOUT_TASKS:
        torch.manual_seed(0)
        inventory.load_state_dict(state)
        adapt_routing(inventory, task, shots=32, steps=100, lr=0.1)
        fewshot[task] = per_task_exact_match(inventory, [task], args.n, EVAL_SEED, task_ids=[0])[task]
    return {
        "share": args.share,
        "backbone_steps": bb.steps_done,
        "backbone_final_loss": round(bb.final_loss, 4),
        "inventory_steps": inv.steps_done,
        "inventory_final_loss": round(inv.final_loss, 4),
        "prefixed_singles": round(singles, 4),
        "prefixed_train_pairs": round(pairs, 4),
        "prefixed_heldout_pairs": round(unseen, 4),
        "routed_train": round(routed, 4),
        "mhr_z_heldout": round(mean(fewshot), 4),
        "mhr_z_per_task": {task: round(score, 3) for task, score in fewshot.items()},
        "minutes": round((time.monotonic() - start) / 60, 1),
    }


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(json.dumps(probe(parse_args(argv))), flush=True)


if __name__ == "__main__":
    main()
