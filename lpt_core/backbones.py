"""Build the frozen ViT backbone: timm pretrained weights, a local weights file, or random init.

Nothing is downloaded when the weights are already in the Hugging Face cache or given as a file.
Without them, when ``HF_HUB_OFFLINE`` is set or the hub cannot be reached (``lpt_core.reachability``:
one quiet connection attempt), the builder fails at once with one line that says what was asked
for and how to supply a local file, instead of a minute of timm's retries and a traceback.
``build_architecture`` builds the model without any weights (on the meta device) and
``weights_source`` says where the weights would come from, for a dry run that loads none.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.data import resolve_model_data_config

from .data.transforms import RELEASED, InputConfig, InputOverrides
from .reachability import unreachable

RANDOM, PRETRAINED = "random", "pretrained"
# Pretrained tags of the JAX-trained ViTs the LPT release fine-tunes (augreg_*, orig_in21k): their
# mean/std is 0.5 and the release resizes them bilinearly to a 256x256 square, center-crops 224,
# where timm's config says bicubic 0.9 of the short side (its own evaluation). Every other backbone
# takes timm's numbers as they are and resizes the short side.
RELEASED_RECIPE_TAGS = ("augreg", "orig_in21k")


def _hub_id(name: str) -> str | None:
    cfg = timm.models.get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_unreachable() -> str | None:
    why = unreachable(_hub_endpoint())
    return f"the Hugging Face hub cannot be reached ({why})" if why else None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _cached(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, filename), str):
            return True
    return False


def _load_local(name: str, path: Path, kwargs: dict) -> nn.Module:
    """Load a local weights file strictly (no pickle: safetensors or ``weights_only`` torch files),
    through the model's own checkpoint filter (timm, JAX or original layouts), minus its classifier."""
    model = timm.create_model(name, pretrained=False, **kwargs)
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, model)
    except Exception as exc:  # unreadable file or a layout the filter cannot convert
        raise ValueError(
            f"backbone.weights: {path} does not load into {name}: {str(exc).splitlines()[0][:200]}"
        ) from None
    classifier = model.pretrained_cfg.get("classifier", "head")
    state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(
            f"backbone.weights: {path} does not load into {name}: {str(exc).splitlines()[1].strip()[:200]}"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"backbone.weights: {path} does not load into {name} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model


def build_backbone(name: str, weights: str = PRETRAINED, **overrides: Any) -> nn.Module:
    """A timm model without its classifier (``num_classes=0``).

    ``weights``: ``"pretrained"`` (timm / Hugging Face hub weights of ``name``), ``"random"``
    (random init, for tests and smoke runs) or a path to a local weights file (.safetensors,
    .bin or .pth as timm reads them). ``overrides`` go to ``timm.create_model`` (``img_size``,
    ``depth``, ``embed_dim``, ...), e.g. a tiny ViT for CPU runs.
    """
    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"backbone.name: unknown timm model '{name}'")
    kwargs = dict(num_classes=0, **overrides)
    if weights == RANDOM:
        return timm.create_model(name, pretrained=False, **kwargs)
    if weights != PRETRAINED:
        path = Path(os.path.expanduser(str(weights)))
        if not path.is_file():
            raise ValueError(
                f"backbone.weights: no such weights file {path} (use 'pretrained', 'random' or a path to a local file)"
            )
        return _load_local(name, path, kwargs)
    hub_id = _hub_id(name)
    how = (
        f"download them where you are online (hf download {hub_id}) into the Hugging Face cache, "
        f"or set backbone.weights to a local weights file"
    )
    if hub_id and not _cached(hub_id):
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else _hub_unreachable()
        if why:
            raise ValueError(
                f"backbone.weights: pretrained weights for {name} ({hub_id}) are not on this machine and {why}; {how}"
            )
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # network, cache or hub errors all mean: no weights here
        raise ValueError(
            f"backbone.weights: could not get pretrained weights for {name} ({type(exc).__name__}); {how}"
        ) from None


def _name_and_overrides(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A profile's ``backbone`` section as the timm name and its ``create_model`` keywords."""
    overrides = dict(spec)
    overrides.pop("weights", None)
    name = overrides.pop("name", None)
    if not name or not timm.is_model(name.split(".")[0]):
        raise ValueError(f"backbone.name: unknown timm model '{name}'")
    return name, overrides


def build_architecture(spec: dict[str, Any]) -> nn.Module:
    """The backbone of a profile's ``backbone`` section without weights, on the meta device: its
    blocks and pretrained config, no memory, nothing loaded or downloaded."""
    name, overrides = _name_and_overrides(spec)
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0, **overrides)


def weights_source(spec: dict[str, Any]) -> str:
    """Where a search takes the weights of a profile's ``backbone`` section from, in words
    (looks at no file and no network)."""
    weights = spec.get("weights", PRETRAINED)
    if weights == RANDOM:
        return "random (nothing to load)"
    if weights != PRETRAINED:
        return f"the file {Path(os.path.expanduser(str(weights)))}"
    hub_id = _hub_id(spec["name"])
    if hub_id is None:
        return f"timm's pretrained source for {spec['name']}"
    fallback = "HF_HUB_OFFLINE is set, so no download" if _hub_offline() else f"else downloaded from {_hub_endpoint()}"
    return f"{hub_id} in the Hugging Face cache {_hub_cache()} ({fallback})"


def build_backbone_from_spec(spec: dict[str, Any]) -> nn.Module:
    """``{"name": ..., "weights": ..., **overrides}`` as written in a profile's ``backbone`` section."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if not name:
        raise ValueError("backbone.name: missing")
    return build_backbone(name, spec.pop("weights", PRETRAINED), **spec)


def input_config(backbone: nn.Module | dict[str, Any], overrides: InputOverrides | dict | None = None) -> InputConfig:
    """How images must be prepared for ``backbone`` (a model, or a profile's backbone spec, which
    is built on the meta device: no weights, no memory): mean, std, interpolation and crop ratio
    from its pretrained config (``timm.data.resolve_model_data_config``) with a short-side eval
    resize, the released LPT recipe's resampling and square resize for ``RELEASED_RECIPE_TAGS``,
    then ``overrides`` (a profile's ``input`` section)."""
    if isinstance(backbone, dict):
        backbone = build_architecture(backbone)
    timm_cfg = resolve_model_data_config(backbone)
    tag = str((getattr(backbone, "pretrained_cfg", None) or {}).get("tag") or "")
    values = {"mean": list(timm_cfg["mean"]), "std": list(timm_cfg["std"])}
    if tag.startswith(RELEASED_RECIPE_TAGS):
        values.update(
            interpolation=RELEASED.interpolation, crop_pct=RELEASED.crop_pct, eval_resize=RELEASED.eval_resize
        )
    else:  # torchvision resamples bilinear or bicubic; timm's rarer modes map to bicubic
        values.update(
            interpolation="bilinear" if timm_cfg["interpolation"] == "bilinear" else "bicubic",
            crop_pct=float(timm_cfg["crop_pct"]),
            eval_resize="short_side",
        )
    if overrides:
        given = overrides.model_dump(exclude_none=True) if isinstance(overrides, InputOverrides) else overrides
        values.update({k: v for k, v in given.items() if v is not None})
    return InputConfig.from_dict(values, where="input")
