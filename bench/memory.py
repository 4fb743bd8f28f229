"""The paper's model size with default settings: does the server start, how much memory does it take, does it
answer? Prints one JSON object.

Builds once (then reused from --cache) a random T5-XL-shaped T5 v1.1 (d_model 2048, d_ff 5120, 24 + 24 layers,
32 heads, gated-gelu: 2.85 B parameters, 11.4 GB in float32) and an MHR inventory of that size (K=8, H=64, r=1
on q, k, v, o, wi_0, wi_1, wo: 432 modules, 64 tasks). Starts `python -m server` on them with no MHR_* setting but
the paths, sends one single-task request and one request per task for 16 distinct tasks (sent together, so
they share the running batch), and reports start-up, peak RSS, the memory plan and the 16-task tokens/s.

    .venv/bin/python bench/memory.py [--cache ~/.cache/mhr-bench/t5-xl] [--new-tokens 16]
Not part of CI: it needs ~12 GB of RAM and ~15 GB of disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.serving_http import free_port  # noqa: E402
from bench.soak import peak_rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")
K, H, R, TASKS = 8, 64, 1, 64


def build_model(folder: Path) -> T5ForConditionalGeneration:
    config = T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                      num_heads=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return model


def build_inventory(model: T5ForConditionalGeneration, folder: Path) -> None:
    """PEFT's Poly file layout, written directly (PEFT would wrap an 11 GB model a second time)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            d_in, d_out = module.in_features, module.out_features
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.poly_lora_A"] = torch.randn(H, K, d_in // H, R, generator=gen) * d_in ** -0.5
            tensors[f"{prefix}.poly_lora_B"] = torch.randn(H, K, R, d_out // H, generator=gen) * 0.1
            tensors[f"{prefix}.poly_router.module_logits"] = torch.randn(TASKS, H * K, generator=gen) * 2
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "POLY", "task_type": "SEQ_2_SEQ_LM", "r": R, "n_tasks": TASKS, "n_skills": K,
              "n_splits": H, "poly_type": "poly", "target_modules": list(TARGETS), "base_model_name_or_path": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "tasks.json").write_text(json.dumps([f"task-{i:02d}" for i in range(TASKS)]))


def ensure_bundle(cache: Path) -> tuple[Path, Path, float]:
    model_dir, inventory = cache / "model", cache / "inventory"
    if (inventory / "tasks.json").is_file() and (model_dir / "config.json").is_file():
        return model_dir, inventory, 0.0
    start = time.monotonic()
    model = build_model(model_dir)
    build_inventory(model, inventory)
    del model
    return model_dir, inventory, time.monotonic() - start


async def generate_together(base: str, tasks: list[str], new_tokens: int) -> tuple[int, float]:
    async with httpx.AsyncClient(timeout=3600) as http:
        start = time.perf_counter()
        responses = await asyncio.gather(*(http.post(f"{base}/generate", json={
            "task": task, "inputs": f"input for {task}", "max_new_tokens": new_tokens, "ignore_eos": True})
            for task in tasks))
        elapsed = time.perf_counter() - start
    for response in responses:
        response.raise_for_status()
    return sum(r.json()["usage"]["completion_tokens"] for r in responses), elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mhr-bench" / "t5-xl")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    model_dir, inventory, build_s = ensure_bundle(args.cache)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MHR_")}
    env.update(MHR_MODEL=str(model_dir), MHR_INVENTORY=str(inventory), MHR_ADAPTED_DIR=str(args.cache / "adapted"),
               MHR_PORT=str(port), HF_HUB_OFFLINE="1")
    base = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=env, stdout=sys.stderr)  # stdout: the JSON
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    result: dict = {"build_s": round(build_s, 1), "memory_total_gb": round(total / 1e9, 2)}
    try:
        ready = None
        while proc.poll() is None and time.monotonic() - start < 1800:
            try:
                response = httpx.get(f"{base}/readyz", timeout=2)
                if response.status_code == 200:
                    ready = response.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        result.update(started=ready is not None, exit_code=proc.poll())
        if ready is not None:
            result.update(ready_s=round(time.monotonic() - start, 1), plan=ready["memory"])
            tasks = [f"task-{i:02d}" for i in range(16)]
            one, one_s = asyncio.run(generate_together(base, tasks[:1], args.new_tokens))
            many, many_s = asyncio.run(generate_together(base, tasks, args.new_tokens))
            result.update(single_task_tokens=one, single_task_s=round(one_s, 1), tasks_16_tokens=many,
                          tasks_16_tokens_per_s=round(many / many_s, 2), all_answered=many == 16 * args.new_tokens)
        if proc.poll() is None:
            rss = peak_rss_mb(proc.pid) * 2**20
            result.update(peak_rss_gb=round(rss / 1e9, 2), peak_rss_share_of_memory=round(rss / total, 3))
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
