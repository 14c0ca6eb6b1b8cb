"""Prompt files: safetensors with prompts, keys and head only; names and shapes are checked."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lpt_core import LPT, load_prompts, save_prompts


def make(backbone, **kw):
    return LPT(backbone, 6, **{**dict(prompt_length=3, pool_size=4, top_k=2, group_start=2), **kw})


def test_round_trip_holds_only_prompts(backbone, tmp_path):
    model = make(backbone)
    path = tmp_path / "prompts.safetensors"
    save_prompts(model, path, trial="t1")
    tensors = load_file(str(path))
    assert set(tensors) == {"shared_prompts", "group_prompts", "group_keys", "head_weight"}
    assert tensors["group_prompts"].shape == (4, 2, 3, 64)
    other = make(backbone, init_seed=1)
    assert not torch.equal(other.shared_prompts, model.shared_prompts)
    assert load_prompts(other, path) == {"trial": "t1"}
    for name, t in model.prompt_state_dict().items():
        assert torch.equal(other.prompt_state_dict()[name], t)


def test_vit_b_prompt_file_is_a_few_mb(tmp_path):
    from lpt_core import build_backbone

    model = LPT(build_backbone("vit_base_patch16_224", "random"), 100)
    path = tmp_path / "p.safetensors"
    save_prompts(model, path)
    assert 3e6 < path.stat().st_size < 6e6


def test_wrong_shape_names_the_tensor(backbone, tmp_path):
    path = tmp_path / "p.safetensors"
    save_prompts(make(backbone, prompt_length=5), path)
    with pytest.raises(ValueError, match="shared_prompts: shape"):
        load_prompts(make(backbone), path)


def test_wrong_name_and_missing_name(backbone, tmp_path):
    sd = {k: v.clone() for k, v in make(backbone).prompt_state_dict().items()}
    sd["extra"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="extra: not an LPT prompt tensor"):
        load_prompts(make(backbone), tmp_path / "a.safetensors")
    del sd["extra"], sd["group_keys"]
    save_file(sd, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="group_keys: missing"):
        load_prompts(make(backbone), tmp_path / "b.safetensors")


def test_not_a_safetensors_file_is_refused_without_unpickling(backbone, tmp_path):
    path = tmp_path / "p.safetensors"
    torch.save(make(backbone).prompt_state_dict(), path)  # a pickle
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_prompts(make(backbone), path)
