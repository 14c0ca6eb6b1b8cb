"""Backbone builder: random init, a local weights file, clear errors offline."""

import pytest
import torch
from safetensors.torch import save_file

from lpt_core import build_backbone
from lpt_core.backbones import build_backbone_from_spec

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)


def test_local_weights_file_loads_exactly(tmp_path):
    torch.manual_seed(1)
    source = build_backbone("vit_tiny_patch16_224", "random", **TINY)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = build_backbone_from_spec({"name": "vit_tiny_patch16_224", "weights": str(path), **TINY})
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_offline_pretrained_fails_fast_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ValueError) as err:
        build_backbone("vit_base_patch16_224.augreg_in21k", "pretrained")
    msg = str(err.value)
    assert msg.startswith("backbone.weights:") and "\n" not in msg
    assert "timm/vit_base_patch16_224.augreg_in21k" in msg and "local weights file" in msg


def test_bad_names_and_files(tmp_path):
    with pytest.raises(ValueError, match="^backbone.name: unknown timm model"):
        build_backbone("not_a_model", "random")
    with pytest.raises(ValueError, match="^backbone.weights: no such weights file"):
        build_backbone("vit_tiny_patch16_224", str(tmp_path / "missing.safetensors"))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(3)}, str(wrong))
    with pytest.raises(ValueError, match="^backbone.weights: .* does not load"):
        build_backbone("vit_tiny_patch16_224", str(wrong), **TINY)
