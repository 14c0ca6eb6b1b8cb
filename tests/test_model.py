"""LPT model: shared-trunk forward equals the plain two-pass version; FLOPs; bad arguments."""

import pytest
import torch
import torch.nn as nn

from conftest import tiny_backbone
from lpt_core import LPT, build_backbone
from lpt_core.flops import count_flops
from lpt_core.reference import plain_forward


@pytest.mark.parametrize("phase", [1, 2])
def test_forward_equals_plain_two_pass(backbone, phase):
    model = LPT(backbone, 7, prompt_length=3, pool_size=5, top_k=2, group_start=2).set_phase(phase)
    model.eval()
    images = torch.randn(6, 3, 32, 32)
    logits, aux = model(images)
    ref_logits, ref_aux = plain_forward(model, images)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert logits.shape == (6, 7) and logits.abs().max() <= 1 + 1e-6
    if phase == 2:
        torch.testing.assert_close(aux["match"], ref_aux["match"], rtol=1e-5, atol=1e-6)
        assert torch.equal(aux["prompt_idx"], ref_aux["prompt_idx"])
        assert aux["prompt_idx"].shape == (6, 2)
    else:
        assert aux == {}


def test_gradients_reach_only_the_phase_parameters(backbone):
    model = LPT(backbone, 5, prompt_length=2, pool_size=4, top_k=2, group_start=2)
    images = torch.randn(4, 3, 32, 32)
    for phase, trained in ((1, {"shared_prompts", "head.weight"}),
                           (2, {"group_prompts", "group_keys", "head.weight"})):
        model.set_phase(phase).train()
        model.zero_grad(set_to_none=True)
        logits, aux = model(images)
        (logits.sum() - aux.get("match", 0)).backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
        assert got == trained
        assert all(not p.requires_grad for p in model.backbone.parameters())


def test_phase2_trunk_keeps_no_graph(backbone):
    """Blocks below group_start run under no_grad in phase 2: their output has no grad_fn."""
    model = LPT(backbone, 5, prompt_length=2, pool_size=4, top_k=1, group_start=2).set_phase(2)
    seen = []
    model.backbone.blocks[1].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    model.backbone.blocks[2].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    model(torch.randn(2, 3, 32, 32))
    # block 1 once (trunk), block 2 twice (query path without grad, main path with grad)
    assert seen == [False, False, True]


def test_phase2_step_flops_vit_b16_at_most_082_of_plain():
    torch.manual_seed(0)
    model = LPT(build_backbone("vit_base_patch16_224", "random"), 100).set_phase(2).train()
    images = torch.randn(2, 3, 224, 224)

    def step(forward):
        logits, aux = forward(images)
        (logits.sum() - aux["match"]).backward()

    lean = count_flops(lambda: step(model))
    plain = count_flops(lambda: step(lambda x: plain_forward(model, x)))
    ratio = lean / plain
    print(f"ViT-B/16 phase-2 step GFLOP/img: shared trunk {lean / 2e9:.1f}, plain {plain / 2e9:.1f}, "
          f"ratio {ratio:.3f}")
    assert 0.75 < ratio <= 0.82
    assert 70e9 < lean / 2 < 85e9  # about 76.9 GFLOP per image


def test_parameter_count_vit_b16_paper_sizes():
    model = LPT(build_backbone("vit_base_patch16_224", "random"), 100)
    counts = model.parameter_counts()
    expected = 12 * 10 * 768 + 20 * 6 * 10 * 768 + 20 * 768 + 100 * 768
    assert counts["extra_params"] == expected
    assert 1.0 < counts["extra_percent"] < 1.4


@pytest.mark.parametrize("kwargs, field", [
    (dict(top_k=5, pool_size=4), "top_k"),
    (dict(group_start=0), "group_start"),
    (dict(group_start=4), "group_start"),
    (dict(prompt_length=0), "prompt_length"),
    (dict(pool_size=0), "pool_size"),
])
def test_bad_arguments_name_the_field(backbone, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        LPT(backbone, 5, **kwargs)


def test_backbone_without_class_token_is_refused():
    bb = tiny_backbone(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match=r"^backbone:"):
        LPT(bb, 5)
    with pytest.raises(ValueError, match=r"^backbone:"):
        LPT(nn.Linear(3, 3), 5)


def test_any_depth_width_patch(backbone):
    bb = tiny_backbone(depth=3, embed_dim=48, num_heads=3, patch_size=4)
    model = LPT(bb, 3, prompt_length=2, pool_size=3, top_k=3, group_start=1).set_phase(2)
    logits, aux = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3) and aux["prompt_idx"].shape == (2, 3)
