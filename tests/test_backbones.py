"""Backbone builder: random init, a local weights file, clear errors offline (at once, whether
HF_HUB_OFFLINE is set or the hub cannot be reached), the architecture alone for a dry run."""

import socket
import time

import pytest
import torch
from cluster_fixtures import free_port
from safetensors.torch import save_file

from lpt_core import build_backbone, reachability
from lpt_core.backbones import build_architecture, build_backbone_from_spec, weights_source
from lpt_core.reachability import connect_target, unreachable

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


def closed_endpoint(monkeypatch, tmp_path) -> str:
    """A hub that refuses connections, an empty Hugging Face cache and no HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    return endpoint


def test_an_unreachable_hub_fails_at_once_with_one_line(monkeypatch, tmp_path):
    endpoint = closed_endpoint(monkeypatch, tmp_path)
    started = time.monotonic()
    with pytest.raises(ValueError) as err:
        build_backbone("vit_base_patch16_224.augreg_in21k", "pretrained")
    assert time.monotonic() - started < 30  # loose: the shared machine is noisy; no retries happen
    assert str(err.value) == (
        f"backbone.weights: pretrained weights for vit_base_patch16_224.augreg_in21k "
        f"(timm/vit_base_patch16_224.augreg_in21k) are not on this machine and the Hugging Face hub cannot be "
        f"reached ({endpoint[len('http://') :]}: connection refused); download them where you are online "
        f"(hf download timm/vit_base_patch16_224.augreg_in21k) into the Hugging Face cache, or set "
        f"backbone.weights to a local weights file"
    )


def test_the_architecture_and_where_its_weights_come_from(monkeypatch, tmp_path):
    endpoint = closed_endpoint(monkeypatch, tmp_path)
    spec = {"name": "vit_base_patch16_224.augreg_in21k", "weights": "pretrained"}
    model = build_architecture(spec)
    assert len(model.blocks) == 12 and next(model.parameters()).device.type == "meta"
    assert weights_source(spec) == (
        f"timm/vit_base_patch16_224.augreg_in21k in the Hugging Face cache {tmp_path} (else downloaded from {endpoint})"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights_source(spec).endswith("(HF_HUB_OFFLINE is set, so no download)")
    assert (
        weights_source({**spec, "weights": str(tmp_path / "vit.safetensors")}) == f"the file {tmp_path}/vit.safetensors"
    )
    assert weights_source({**spec, "weights": "random"}) == "random (nothing to load)"


def test_reachability_asks_once_through_the_proxy_the_environment_names(monkeypatch):
    port = free_port()
    for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert connect_target("https://huggingface.co/x") == ("huggingface.co", 443)
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    assert connect_target("https://huggingface.co/x") == ("127.0.0.1", port)
    assert unreachable("https://huggingface.co/x") == f"127.0.0.1:{port}: connection refused"
    asked = reachability._connect_error.cache_info().misses
    assert unreachable("https://example.org/y") == f"127.0.0.1:{port}: connection refused"
    assert reachability._connect_error.cache_info().misses == asked  # the same proxy: not asked again
    monkeypatch.setenv("no_proxy", "huggingface.co")
    assert connect_target("https://huggingface.co/x") == ("huggingface.co", 443)
    with socket.create_server(("127.0.0.1", 0)) as server:  # a listening host is reachable
        assert unreachable(f"http://127.0.0.1:{server.getsockname()[1]}/") is None
