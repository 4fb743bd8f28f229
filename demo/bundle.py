"""The demo bundle on disk: model/ (T5 + ByT5 tokenizer), inventory/ (PEFT Poly + tasks.json), build_info.

```
<bundle>/model/                         save_pretrained: config.json, model.safetensors, tokenizer files
<bundle>/inventory/adapter_config.json  PEFT, peft_type "POLY"
<bundle>/inventory/adapter_model.safetensors
<bundle>/inventory/tasks.json           {"reverse-upper": 0, ...}: task name -> router row
<bundle>/build_info.json                seed, phase minutes, final losses, hyper-parameters
```
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, ByT5Tokenizer

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "bundle"
BASE_MODEL_NAME = "demo/bundle/model"  # written into adapter_config.json: local and harmless


def model_dir(bundle: Path) -> Path:
    return Path(bundle) / "model"


def inventory_dir(bundle: Path) -> Path:
    return Path(bundle) / "inventory"


def portable_t5(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose saved config means the same thing to transformers 4.x and 5.x.

    transformers 5 always ties T5's embeddings and turns ``tie_word_embeddings=False`` into
    ``scale_decoder_outputs=False``, but saves ``tie_word_embeddings: true``, which transformers 4 reads
    as "scale the decoder output by d_model**-0.5". Folding sqrt(d_model) into the decoder's final RMS
    norm weight makes the scaled model compute the same logits, so both versions load it correctly.
    """
    if getattr(model.config, "scale_decoder_outputs", True):
        return model
    portable = type(model)(model.config.__class__.from_dict(model.config.to_dict()))
    portable.load_state_dict(model.state_dict())
    with torch.no_grad():
        portable.decoder.final_layer_norm.weight.mul_(model.config.d_model**0.5)  # (d_model,)
    portable.config.scale_decoder_outputs = True
    return portable.eval()


def save_backbone(model: torch.nn.Module, bundle: Path) -> None:
    out = model_dir(bundle)
    model = portable_t5(model)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    ByT5Tokenizer().save_pretrained(out)


def save_inventory(peft_model: PeftModel, tasks: list[str], bundle: Path) -> None:
    out = inventory_dir(bundle)
    peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL_NAME
    peft_model.save_pretrained(out, safe_serialization=True)
    _sort_target_modules(out / "adapter_config.json")
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template, with a build path in it
    rows = {task: row for row, task in enumerate(tasks)}
    (out / "tasks.json").write_text(json.dumps(rows, indent=2) + "\n")


def _sort_target_modules(config_path: Path) -> None:
    """PEFT stores target_modules as a set (order varies per process); sort it for reproducible bytes."""
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_world_readable(bundle: Path) -> None:
    """safetensors files are written 0600; a server running as another user (Docker) must read them."""
    for path in Path(bundle).rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def write_build_info(info: dict, bundle: Path) -> None:
    (Path(bundle) / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")


def load_backbone(bundle: Path):
    """(model in eval mode, tokenizer) with plain transformers, offline."""
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir(bundle))
    tokenizer = AutoTokenizer.from_pretrained(model_dir(bundle))
    return model.eval(), tokenizer


def load_inventory(bundle: Path, backbone=None) -> PeftModel:
    """PeftModel.from_pretrained on the bundle's backbone (loaded fresh unless given), in eval mode."""
    base = backbone if backbone is not None else load_backbone(bundle)[0]
    return PeftModel.from_pretrained(base, str(inventory_dir(bundle))).eval()


def read_build_info(bundle: Path) -> dict:
    path = Path(bundle) / "build_info.json"
    return json.loads(path.read_text()) if path.exists() else {}


def load_task_rows(bundle: Path) -> dict[str, int]:
    return json.loads((inventory_dir(bundle) / "tasks.json").read_text())


def bundle_megabytes(bundle: Path) -> float:
    return sum(p.stat().st_size for p in Path(bundle).rglob("*") if p.is_file()) / 1e6
