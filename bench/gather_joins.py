"""MHR_GATHER_JOINS on and off over HTTP, servers taking turns: 32 clients, each sending its next request as soon as
the last is answered, until `--requests` are served (after an untimed pass of 64). Past the first requests the
clients fall out of step, rows end and arrive at most steps, and that is where gathering joins matters (the
32-client pass of bench/serving_http.py runs in lockstep and does not exercise it). Prints JSON: tokens/s and rows
per joining prefill (from /metrics) per round and side.

    .venv/bin/python bench/gather_joins.py [--rounds 2] [--requests 320] [--model DIR --inventory DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serving_http import _clients, loop_counters, loop_report, served  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "demo" / "bundle"


def one_side(model: Path, inventory: Path, adapted: Path, gather: str, requests: int, device: str) -> dict:
    with served(model, inventory, adapted, None, device, MHR_GATHER_JOINS=gather) as (base, tasks):
        asyncio.run(_clients(base, tasks, 64, 32, 32))
        before = loop_counters(base)
        tokens_per_s = asyncio.run(_clients(base, tasks, requests, 32, 32))
        loop = loop_report(before, loop_counters(base))
    return {"tokens_per_s": round(tokens_per_s, 1), **loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--model", type=Path, default=DEMO / "model")
    parser.add_argument("--inventory", type=Path, default=DEMO / "inventory")
    parser.add_argument("--device", default="cpu", help="the servers' MHR_DEVICE (cuda: CUDA graphs on by default)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side in ("on", "off") if r % 2 == 0 else ("off", "on"):
                adapted = Path(tmp) / f"adapted-{r}-{side}"
                runs[side].append(one_side(args.model, args.inventory, adapted,
                                           "true" if side == "on" else "false", args.requests, args.device))
    keys = ("tokens_per_s", "rows_per_joining_prefill", "ms_per_joining_prefill")
    median = {side: {key: statistics.median(run[key] for run in runs[side]) for key in keys} for side in runs}
    print(json.dumps({"device": args.device, "requests": args.requests, "clients": 32, "rounds": runs, "median": median,
                      "tokens_per_s_on_vs_off": round(median["on"]["tokens_per_s"] / median["off"]["tokens_per_s"], 3)},
                     indent=1))


if __name__ == "__main__":
    main()
