"""What log-probabilities and structured output cost in the serving loop, in-process on the demo bundle. Prints JSON.

    logprobs_tokens_per_s_vs_plain       16 rows of 32 tokens with `logprobs: 5` (each token's log-probability and
                                         the 5 most likely) / the same rows without          goal ≥ 0.90
    structured_tokens_per_s_vs_free      16 rows, half constrained by a JSON schema (llguidance masks per row, per
                                         step) / 16 free rows; tokens per second of each batch goal ≥ 0.85
Interleaved rounds, medians; run alone on the machine: `.venv/bin/python bench/ecosystem.py` (`--rounds N`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import llguidance
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter_store import AdapterCache, AdapterStore  # noqa: E402
from server.engine import Engine, GenerateRow, SamplingParams, load_model  # noqa: E402
from server.engine.guided import JSON_OPTIONS  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "demo" / "bundle"
ROWS, TOKENS = 16, 32
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["name", "count"], "additionalProperties": False}


def rows(tasks: list[str], *, logprobs: int | None = None, guided_every: int = 0) -> list[GenerateRow]:
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults=JSON_OPTIONS)
    out = []
    for i in range(ROWS):
        guided = guided_every and i % guided_every == 0
        params = (SamplingParams(max_new_tokens=TOKENS * 2, grammar=grammar) if guided else
                  SamplingParams(max_new_tokens=TOKENS, ignore_eos=True, logprobs=logprobs))
        out.append(GenerateRow(tasks[i % len(tasks)], f"input text {i}", params))
    return out


def tokens_per_s(engine: Engine, batch: list[GenerateRow]) -> tuple[float, list]:
    start = time.perf_counter()
    done = engine.generate(batch)
    return sum(c.completion_tokens for c in done) / (time.perf_counter() - start), done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = AdapterStore.open(DEMO / "inventory")
    engine = Engine(load_model(DEMO / "model", device="cpu"), store, AdapterCache(10**9), max_batch_size=ROWS)
    tasks = [t.name for t in store.tasks() if t.kind == "pretrained"][:ROWS]
    modes = {"plain": rows(tasks), "logprobs": rows(tasks, logprobs=5), "structured": rows(tasks, guided_every=2)}
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    tokens_per_s(engine, modes["structured"])  # warm up: grammars, adapters
    parsed = []
    for round_ in range(args.rounds):
        order = list(modes)[round_ % 3:] + list(modes)[: round_ % 3]
        for mode in order:
            rate, done = tokens_per_s(engine, modes[mode])
            rates[mode].append(rate)
            if mode == "structured":
                parsed += [json.loads(c.text) for c in done[::2]]
    engine.close()
    median = {mode: statistics.median(values) for mode, values in rates.items()}
    print(json.dumps({
        "threads": args.threads, "rounds": args.rounds, "tokens_per_s": {m: round(v, 1) for m, v in median.items()},
        "logprobs_tokens_per_s_vs_plain": round(median["logprobs"] / median["plain"], 3),
        "structured_tokens_per_s_vs_free": round(median["structured"] / median["plain"], 3),
        "structured_outputs_parsed": f"{len(parsed)}/{args.rounds * ROWS // 2}",
    }, indent=1))


if __name__ == "__main__":
    main()
