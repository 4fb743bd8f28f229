"""Build the demo bundle: a tiny byte-level T5 backbone, then an MHR inventory on the training tasks.

    HF_HUB_OFFLINE=1 python -m demo.build [--seed 0] [--out demo/bundle] [--minutes 30] [--quick] [--reuse-backbone]
        [--prefixed-inventory]

Deterministic from the seed (fixed step counts, seeded data and init) as long as the ``--minutes``
safety cap is not hit; build_info.json records the steps actually done.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from demo.backbone import BackboneHparams, train_backbone
from demo.bundle import (
    DEFAULT_BUNDLE,
    bundle_megabytes,
    inventory_dir,
    load_backbone,
    make_world_readable,
    read_build_info,
    save_backbone,
    save_inventory,
    write_build_info,
)
from demo.inventory import InventoryHparams, count_trainable, poly_config, train_adapters
from demo.tasks import HELDOUT_TASKS, TRAIN_TASKS, backbone_curriculum
from demo.train_loop import LoopResult

QUICK_BACKBONE_STEPS, QUICK_INVENTORY_STEPS = 150, 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock safety cap for training")
    parser.add_argument("--backbone-steps", type=int, default=BackboneHparams.steps)
    parser.add_argument("--inventory-steps", type=int, default=InventoryHparams.steps)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of the pipeline")
    # One thread: on a shared 2-core machine, 2 torch threads were up to 10x slower than 1 (spin-waits).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--reuse-backbone", action="store_true", help="load <out>/model instead of training it (phase a)"
    )
    parser.add_argument(
        "--prefixed-inventory",
        action="store_true",
        help="train the inventory with the instruction prefix in every input (experiment; write it to another --out)",
    )
    return parser.parse_args(argv)


def _deadline(start: float, minutes: float, share: float) -> float:
    """The time after which a phase stops, giving it ``share`` of the total cap (measured from start)."""
    return start + 60.0 * minutes * share


def _previous_backbone_result(out: Path) -> LoopResult:
    """The backbone phase as recorded by the build that trained the reused backbone."""
    info = read_build_info(out)
    return LoopResult(
        steps_done=info.get("steps_done", {}).get("backbone", 0),
        seconds=60.0 * info.get("minutes", {}).get("backbone", 0.0),
        final_loss=info.get("final_train_loss", {}).get("backbone", float("nan")),
        log=info.get("loss_log", {}).get("backbone", []),
    )


def _backbone_phase(args: argparse.Namespace, hp: BackboneHparams, start: float):
    """Phase a: train (or reuse) the backbone; it is saved at once with a partial build_info."""
    if args.reuse_backbone:
        previous = read_build_info(args.out).get("backbone_hparams")
        return load_backbone(args.out)[0], _previous_backbone_result(args.out), previous or vars(hp)
    backbone, result = train_backbone(hp, args.seed, deadline=_deadline(start, args.minutes, 0.65))
    save_backbone(backbone, args.out)
    partial = {"minutes": {"backbone": round(result.seconds / 60, 2)}, "backbone_hparams": vars(hp)}
    partial |= {"steps_done": {"backbone": result.steps_done}, "loss_log": {"backbone": result.log}}
    write_build_info(partial | {"final_train_loss": {"backbone": round(result.final_loss, 4)}}, args.out)
    return backbone, result, vars(hp)


def _build_info(args, bb: LoopResult, inv: LoopResult, bb_hp: dict, inv_hp: InventoryHparams, start: float):
    total = (time.monotonic() - start + (bb.seconds if args.reuse_backbone else 0.0)) / 60
    return {
        "seed": args.seed,
        "reused_backbone": args.reuse_backbone,
        "prefixed_inventory": args.prefixed_inventory,
        "quick": args.quick,
        "threads": args.threads,
        "minutes": {"backbone": round(bb.seconds / 60, 2), "inventory": round(inv.seconds / 60, 2)}
        | {"total": round(total, 2)},
        "steps_done": {"backbone": bb.steps_done, "inventory": inv.steps_done},
        "final_train_loss": {"backbone": round(bb.final_loss, 4), "inventory": round(inv.final_loss, 4)},
        "backbone_hparams": bb_hp,
        "inventory_hparams": vars(inv_hp),
        "train_tasks": TRAIN_TASKS,
        "heldout_tasks": HELDOUT_TASKS,
        "backbone_curriculum": backbone_curriculum(),  # instruction-prefixed; no held-out composition
        "loss_log": {"backbone": bb.log, "inventory": inv.log},
    }


def build(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.monotonic()
    bb_hp = BackboneHparams(steps=QUICK_BACKBONE_STEPS if args.quick else args.backbone_steps)
    inv_hp = InventoryHparams(steps=QUICK_INVENTORY_STEPS if args.quick else args.inventory_steps)
    backbone, bb_result, bb_hp_used = _backbone_phase(args, bb_hp, start)
    for param in backbone.parameters():
        param.requires_grad_(False)
    config = poly_config(inv_hp, n_tasks=len(TRAIN_TASKS))
    deadline = _deadline(start, args.minutes, 1.0)
    inventory, inv_result = train_adapters(
        backbone, config, TRAIN_TASKS, inv_hp, args.seed, deadline=deadline, prefixed=args.prefixed_inventory
    )

    if inventory_dir(args.out).exists():
        shutil.rmtree(inventory_dir(args.out))
    save_inventory(inventory, TRAIN_TASKS, args.out)
    info = _build_info(args, bb_result, inv_result, bb_hp_used, inv_hp, start)
    info["backbone_params"] = sum(p.numel() for p in backbone.parameters())
    info["inventory_params"] = count_trainable(inventory)
    write_build_info(info, args.out)
    make_world_readable(args.out)
    info["bundle_mb"] = round(bundle_megabytes(args.out), 2)
    return info


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    info = build(parse_args(argv))
    print(f"bundle written: {info['bundle_mb']} MB, minutes {info['minutes']}, losses {info['final_train_loss']}")


if __name__ == "__main__":
    main()
