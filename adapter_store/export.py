"""Write a task's adapter as a standard PEFT LoRA folder (peft_type LORA), loadable by
`PeftModel.from_pretrained` and so servable by vLLM or LoRAX too.

PEFT LoRA computes y = base(x) + lora_B(lora_A(x)) * lora_alpha / r, with lora_A.weight (r, d_in) and
lora_B.weight (d_out, r). Ours is x @ A_t @ B_t / r, so lora_A.weight = A_tᵀ, lora_B.weight = B_tᵀ and
lora_alpha = 1 gives the same scaling 1/r.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from .adapter import TaskAdapter
from .inventory import PEFT_PREFIX
from .persistence import writing_to


def lora_config(adapter: TaskAdapter, task_type: str | None, base_model: str | None) -> dict:
    return {
        "peft_type": "LORA",
        "r": adapter.rank,
        "lora_alpha": adapter.scale * adapter.rank,  # alpha / r == scale
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        # full module paths: PEFT matches `name == target or name.endswith("." + target)`, so each
        # entry selects exactly one module (a leaf name like "q" would also select unadapted ones)
        "target_modules": sorted(name for name, _, _ in adapter.layers()),
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
    }


def lora_tensors(adapter: TaskAdapter) -> dict:
    tensors = {}
    for name, a, b in adapter.layers():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.T.contiguous().float().cpu()  # (r, d_in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.T.contiguous().float().cpu()  # (d_out, r)
    return tensors


def export_peft_lora(adapter: TaskAdapter, out_dir: str | Path, *, task_type: str | None = None,
                     base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write adapter_config.json + adapter_model.safetensors into `out_dir` (all or nothing)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    with writing_to(out_dir.parent):  # full disk, read-only: StoreWriteError naming the folder, nothing left
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
        try:
            save_file(lora_tensors(adapter), staging / "adapter_model.safetensors")
            config = lora_config(adapter, task_type, base_model)
            (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return out_dir
