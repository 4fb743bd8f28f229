"""Time to compute one task's routed adapter for a T5-XL-sized random MHR inventory.

T5 v1.1 XL: 24 + 24 blocks, d_model 2048, d_ff 5120, gated FFN -> 432 adapted linears
(encoder q,k,v,o,wi_0,wi_1,wo; decoder q,k,v,o + cross q,k,v,o + wi_0,wi_1,wo). K=8 skills, H=64 heads, r=1.
Prints JSON: ms_per_task (ours: batched over the layers of each shape), ms_per_task_naive_einsum (PEFT's
per-layer einsum, the baseline), ratio, load_ms (Inventory.read of the safetensors file), inventory_mb.

    .venv/bin/python bench/combine.py [--reps 30] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapter_store import AdapterStore
from adapter_store.routing import routing_weights

D_MODEL, D_FF, BLOCKS, K, H, R, N_TASKS = 2048, 5120, 24, 8, 64, 1, 16
ENC = {"layer.0.SelfAttention." + p: (D_MODEL, D_MODEL) for p in "qkvo"}
DEC = {**ENC, **{"layer.1.EncDecAttention." + p: (D_MODEL, D_MODEL) for p in "qkvo"}}


def _ffn(layer: int) -> dict[str, tuple[int, int]]:
    ff = f"layer.{layer}.DenseReluDense."
    return {ff + "wi_0": (D_MODEL, D_FF), ff + "wi_1": (D_MODEL, D_FF), ff + "wo": (D_FF, D_MODEL)}


def module_shapes() -> dict[str, tuple[int, int]]:
    shapes = {}
    for stack, per_block in (("encoder", {**ENC, **_ffn(1)}), ("decoder", {**DEC, **_ffn(2)})):
        for block in range(BLOCKS):
            for suffix, shape in per_block.items():
                shapes[f"{stack}.block.{block}.{suffix}"] = shape
    return shapes


def write_inventory(folder: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (d_in, d_out) in module_shapes().items():
        key = "base_model.model." + name
        tensors[key + ".poly_lora_A"] = torch.randn(H, K, d_in // H, R, generator=gen)
        tensors[key + ".poly_lora_B"] = torch.randn(H, K, R, d_out // H, generator=gen)
        tensors[key + ".poly_router.module_logits"] = torch.randn(N_TASKS, H * K, generator=gen)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "POLY", "r": R, "n_tasks": N_TASKS, "n_skills": K, "n_splits": H,
              "target_modules": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], "task_type": "SEQ_2_SEQ_LM",
              "base_model_name_or_path": "google/t5-v1_1-xl"}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def peft_layout(store: AdapterStore) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per-module contiguous tensors as PEFT holds them: A (H, K, d/H, r), B (H, K, r, d/H), logits."""
    return [
        (g.lora_a[:, i].transpose(0, 1).contiguous(), g.lora_b[:, i].transpose(0, 1).contiguous(), g.logits[i])
        for g in store.inventory.groups
        for i in range(len(g.names))
    ]


def naive_adapter(modules, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's per-layer way: one einsum pair per module."""
    out = []
    for lora_a, lora_b, logits in modules:
        w = routing_weights(logits[row], H, K)  # (H, K)
        a = torch.einsum("qs,qsdr->qdr", w, lora_a).reshape(-1, R)
        b = torch.einsum("qs,qsrd->qrd", w, lora_b).transpose(0, 1).reshape(R, -1)
        out.append((a, b))
    return out


def median_ms(fn, reps: int) -> float:
    times = []
    for i in range(reps + 3):
        start = time.perf_counter()
        fn(i % N_TASKS)
        if i >= 3:  # warm-up
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_inventory(Path(tmp))
        start = time.perf_counter()
        store = AdapterStore.open(tmp)
        load_ms = (time.perf_counter() - start) * 1e3
        ours = median_ms(lambda row: store.adapter(f"task-{row}"), args.reps)
        modules = peft_layout(store)
        naive = median_ms(lambda row: naive_adapter(modules, row), args.reps)
        result = {
            "ms_per_task": round(ours, 2),
            "ms_per_task_naive_einsum": round(naive, 2),
            "speedup_vs_naive": round(naive / ours, 2),
            "load_ms": round(load_ms, 1),
            "modules": len(store.inventory.module_names),
            "inventory_mb": round(store.inventory.nbytes / 2**20, 1),
            "threads": args.threads,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
