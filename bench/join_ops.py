"""What a T5 row's join costs in operators: aten ops dispatched per admission of 8 rows (into an empty batch here; the
same when they join running rows), with
the encoder-only join (PagedKV.encode: the encoder and each layer's cross-attention keys and values; the start token
decodes in the next step) against the full prefill it replaced (encoder and a decoder forward over the start token;
still what beams, Arrow rows and preempted rows take — forced here by `_starts_decoding` answering False). On a GPU
each op is at least one kernel launch and an eager join is launch-bound, while the decoding step it rides along is
one replayed CUDA graph: the count is what a join costs there, measured on any machine. Prints JSON.

    .venv/bin/python bench/join_ops.py [--model DIR --inventory DIR]   (default: the demo bundle)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter_store import AdapterCache, AdapterStore  # noqa: E402
from server.engine import Engine, GenerateRow, SamplingParams, load_model  # noqa: E402
from server.engine.running_batch import RunningBatch  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "demo" / "bundle"


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def counted(method, totals: dict, name: str):
    """The RunningBatch method, counting the ops it dispatches (on the loop's thread) into totals[name]."""
    def wrapper(self, *args):
        with OpCount() as count:
            out = method(self, *args)
        totals[name].append(count.ops)
        return out
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO / "model")
    parser.add_argument("--inventory", type=Path, default=DEMO / "inventory")
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    store = AdapterStore.open(args.inventory)
    engine = Engine(loaded, store, AdapterCache(10**9), prefix_cache=False)
    tasks = [task.name for task in store.tasks() if task.method == "routed"]
    rows = [GenerateRow(tasks[i % len(tasks)], f"input number {i:05d} abcdefgh",
                        SamplingParams(max_new_tokens=4, ignore_eos=True)) for i in range(8)]
    engine.generate(rows)  # the adapters routed and cached: the counts below are joins, not cache misses
    own = RunningBatch._starts_decoding, RunningBatch.admit, RunningBatch.step
    result = {}
    for side, starts in (("encoder_only_join", own[0]), ("full_prefill", lambda self, row: False)):
        totals = {"admit": [], "step": []}
        RunningBatch._starts_decoding = starts
        RunningBatch.admit, RunningBatch.step = counted(own[1], totals, "admit"), counted(own[2], totals, "step")
        try:
            engine.generate(rows)
        finally:
            RunningBatch._starts_decoding, RunningBatch.admit, RunningBatch.step = own
        result[side] = {"ops_per_join_of_8_rows": max(totals["admit"]), "ops_per_step": max(totals["step"]),
                        "steps": len(totals["step"])}
    engine.close()
    result["join_ops_ratio"] = round(result["encoder_only_join"]["ops_per_join_of_8_rows"]
                                     / result["full_prefill"]["ops_per_join_of_8_rows"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
