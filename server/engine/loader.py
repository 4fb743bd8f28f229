"""Load a transformers seq2seq or causal LM and its tokenizer from a local folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    is_seq2seq: bool
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} asked for, but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def eos_token_ids(model) -> frozenset[int]:
    """The ids that end a sequence, from the model's generation config."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset(eos) if isinstance(eos, list) else frozenset([eos])


# transformers ≥ 5 swaps layers for kernels fetched from the Hub by default (and fails on CUDA without the `kernels`
# package): never here. The loop replaces the attention and wraps the linear layers itself, a captured step must not
# change under it, and nothing is downloaded at run time.
NO_HUB_KERNELS = {"use_kernels": False} if hasattr(PreTrainedModel, "set_use_kernels") else {}


def load_model(folder: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json (expected a transformers model folder)")
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    is_seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if is_seq2seq else AutoModelForCausalLM
    model = auto.from_pretrained(folder, local_files_only=True, dtype=torch_dtype, **NO_HUB_KERNELS).to(target).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if not is_seq2seq:
        tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, is_seq2seq, target, torch_dtype)
