"""The released LPT checkpoint (DongSky/LPT, e.g. ``LPT_places.pth``) as the project's ``LPT``.

The release saves its whole model, ``{'state_dict': model.state_dict(), ...}`` (keys prefixed
``module.`` when it was wrapped in DataParallel): the timm ViT it fine-tuned, with
``prompt_learner.Prompt_Tokens`` [depth, L, D], ``prompt_learner.Prompt_Tokens_pool``
[P, depth - S, L, D], ``prompt_learner.Prompt_Keys`` [P, D] and ``prompt_learner.head.weight``
[D, C] (its ``NormedLinear``: one column per class). Every size comes from the tensor shapes
(heads = D / 64, as in every standard ViT; the MLP width from ``fc1``); the backbone is built
from the checkpoint's own weights, so nothing else is needed. Only ``top_k`` is not in the file:
the release's is 2.

The release builds its ViT with ``norm_layer=nn.LayerNorm`` (eps 1e-5, where timm's ViTs use
1e-6), so the backbone here does too: its logits are the released model's, not those of the same
weights under timm's eps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from .model import LPT

PROMPTS = "prompt_learner."
RELEASED_TOP_K = 2  # VPT_ViT(topk=2): not in the state dict
RELEASED_LN_EPS = 1e-5  # nn.LayerNorm's default, as the release passes it to timm's VisionTransformer
HEAD_DIM = 64


@dataclass(frozen=True)
class ReleasedShapes:
    """The sizes a released checkpoint's tensors give."""

    depth: int
    prompt_length: int
    pool_size: int
    group_start: int
    width: int
    num_classes: int
    patch_size: int
    image_size: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool

    def describe(self) -> str:
        return (
            f"ViT depth {self.depth}, width {self.width} ({self.num_heads} heads), patch {self.patch_size}, "
            f"{self.image_size} px; L={self.prompt_length}, P={self.pool_size}, S={self.group_start}, "
            f"{self.num_classes} classes"
        )


def read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a released checkpoint file (no pickled code: ``weights_only``), without
    DataParallel's ``module.`` prefix."""
    try:
        blob = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as exc:  # not a torch file, or one holding more than tensors and plain values
        raise ValueError(
            f"{path}: not a torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        ) from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected {{'state_dict': {{name: tensor}}}} as the LPT release saves it")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _tensor(state: dict, key: str, ndim: int, where: str) -> torch.Tensor:
    t = state.get(key)
    if t is None:
        raise ValueError(f"{where}: not a released LPT checkpoint (no '{key}')")
    if t.ndim != ndim:
        raise ValueError(f"{where}: '{key}' has shape {list(t.shape)}, expected {ndim} dimensions")
    return t


def released_shapes(state: dict[str, torch.Tensor], where: str = "checkpoint") -> ReleasedShapes:
    """Every size of the released model, read from its tensors (``where`` names it in errors)."""
    shared = _tensor(state, PROMPTS + "Prompt_Tokens", 3, where)
    pool = _tensor(state, PROMPTS + "Prompt_Tokens_pool", 4, where)
    _tensor(state, PROMPTS + "Prompt_Keys", 2, where)
    head = _tensor(state, PROMPTS + "head.weight", 2, where)
    patch = _tensor(state, "patch_embed.proj.weight", 4, where)
    pos = _tensor(state, "pos_embed", 3, where)
    depth, length, width = shared.shape
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if blocks != set(range(depth)):
        raise ValueError(f"{where}: {len(blocks)} blocks but Prompt_Tokens for {depth}")
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise ValueError(f"{where}: pos_embed holds {pos.shape[1]} tokens, not a class token and a square grid")
    if width % HEAD_DIM:
        raise ValueError(f"{where}: width {width} is not a multiple of {HEAD_DIM} (heads = D / {HEAD_DIM})")
    fc1 = _tensor(state, "blocks.0.mlp.fc1.weight", 2, where)
    return ReleasedShapes(
        depth=depth,
        prompt_length=length,
        pool_size=pool.shape[0],
        group_start=depth - pool.shape[1],
        width=width,
        num_classes=head.shape[1],
        patch_size=patch.shape[-1],
        image_size=grid * patch.shape[-1],
        num_heads=width // HEAD_DIM,
        mlp_ratio=fc1.shape[0] / width,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
    )


def released_backbone(state: dict[str, torch.Tensor], shapes: ReleasedShapes, where: str = "checkpoint") -> nn.Module:
    """timm's ``VisionTransformer`` of the checkpoint's sizes, holding its weights (strictly)."""
    vit = VisionTransformer(
        img_size=shapes.image_size,
        patch_size=shapes.patch_size,
        num_classes=0,
        embed_dim=shapes.width,
        depth=shapes.depth,
        num_heads=shapes.num_heads,
        mlp_ratio=shapes.mlp_ratio,
        qkv_bias=shapes.qkv_bias,
        norm_layer=partial(nn.LayerNorm, eps=RELEASED_LN_EPS),
    )
    weights = {k: v for k, v in state.items() if not k.startswith(PROMPTS) and not k.startswith("head.")}
    missing, unexpected = vit.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{where}: its ViT does not load into timm's (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return vit


def load_released(
    source: str | os.PathLike | dict[str, torch.Tensor], top_k: int = RELEASED_TOP_K
) -> tuple[LPT, ReleasedShapes]:
    """The released model as an ``LPT`` in phase 2, eval mode, and the sizes it was read with.
    ``source``: a checkpoint file or its state dict."""
    where = "checkpoint" if isinstance(source, dict) else os.fspath(source)
    state = source if isinstance(source, dict) else read_state(source)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    shapes = released_shapes(state, where)
    model = LPT(
        released_backbone(state, shapes, where),
        shapes.num_classes,
        prompt_length=shapes.prompt_length,
        pool_size=shapes.pool_size,
        top_k=top_k,
        group_start=shapes.group_start,
    )
    model.load_prompt_state_dict(
        {
            "shared_prompts": state[PROMPTS + "Prompt_Tokens"],
            "group_prompts": state[PROMPTS + "Prompt_Tokens_pool"],
            "group_keys": state[PROMPTS + "Prompt_Keys"],
            "head_weight": state[PROMPTS + "head.weight"].t(),
        }
    )
    return model.set_phase(2).eval(), shapes
