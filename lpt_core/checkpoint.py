"""Prompt checkpoints and trainer state as safetensors files: tensors plus JSON metadata, no pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .model import LPT, PROMPT_KEYS


def _atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Atomic (``lpt_core.atomic``): a reader sees the old file or the new one."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, metadata


def save_prompts(model: LPT, path: str | os.PathLike, **info) -> None:
    """Write the model's prompts, keys and head (never the backbone) with ``info`` as metadata."""
    meta = {
        "format": "lpt-prompts",
        "info": json.dumps(info, default=str),
        "config": json.dumps(
            {
                "prompt_length": model.prompt_length,
                "pool_size": model.pool_size,
                "top_k": model.top_k,
                "group_start": model.group_start,
                "num_classes": model.num_classes,
            }
        ),
    }
    _atomic_save(model.prompt_state_dict(), path, meta)


def load_prompts(model: LPT, path: str | os.PathLike, strict: bool = True) -> dict:
    """Load a prompt file into ``model``; a wrong name or shape raises ValueError naming it."""
    tensors, meta = _load(path)
    try:
        model.load_prompt_state_dict(tensors, strict=strict)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return json.loads(meta.get("info", "{}"))


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Trainer state: tensors (prompts, momentum buffers, RNG states) plus JSON-able ``meta``."""
    _atomic_save(tensors, path, {"format": "lpt-train-state", "meta": json.dumps(meta)})


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = _load(path)
    if meta.get("format") != "lpt-train-state":
        raise ValueError(f"{path}: not an LPT training state file")
    return tensors, json.loads(meta["meta"])


__all__ = ["save_prompts", "load_prompts", "save_state", "load_state", "PROMPT_KEYS"]
