"""LPT model: shared-trunk forward equals the plain two-pass version; FLOPs; bad arguments; the
initial values come from ``init_seed`` alone, per component."""

import pytest
import torch
import torch.nn as nn
from conftest import tiny_backbone

from lpt_core import LPT, LPTConfig, PhaseConfig, Trainer, build_backbone
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
    for phase, trained in ((1, {"shared_prompts", "head.weight"}), (2, {"group_prompts", "group_keys", "head.weight"})):
        model.set_phase(phase).train()
        model.zero_grad(set_to_none=True)
        logits, aux = model(images)
        (logits.sum() - aux.get("match", 0)).backward()
        got = {n for n, p in model.named_parameters() if p.grad is not None}
        assert got == trained
        assert all(not p.requires_grad for p in model.backbone.parameters())


def test_phase2_trunk_keeps_no_graph(backbone):
    """Blocks below group_start run under no_grad in phase 2: no grad_fn, no saved activations."""
    model = LPT(backbone, 5, prompt_length=2, pool_size=4, top_k=1, group_start=2).set_phase(2)
    seen = []

    def recording(i, fn):
        def run(block, x, prompts):
            out = fn(block, x, prompts)
            seen.append((i, out.requires_grad))
            return out

        return run

    model._block_fns = [recording(i, fn) for i, fn in enumerate(model._block_fns)]
    model(torch.randn(2, 3, 32, 32))
    # trunk 0-1 once, query path 2-3 without grad, main path 2-3 with grad
    assert seen == [(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)]


def saved_activation_bytes(model, images):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        model(images)
    return sum(saved)


def test_phase2_saves_activations_only_above_group_start(backbone):
    images = torch.randn(4, 3, 32, 32)
    one = LPT(backbone, 5, prompt_length=2, pool_size=4, top_k=1, group_start=3).set_phase(2).train()
    three = LPT(backbone, 5, prompt_length=2, pool_size=4, top_k=1, group_start=1).set_phase(2).train()
    one_block, three_blocks = saved_activation_bytes(one, images), saved_activation_bytes(three, images)
    assert 0 < one_block < 0.45 * three_blocks  # 1 block with grad against 3 (head and matching small)


def make_block(kind):
    """A timm Block variant: the fast path handles the first three, the last falls back."""
    from timm.models.vision_transformer import Block

    class Scaled(Block):  # a subclass with its own forward: must use the plain path
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x) * 0.5

    torch.manual_seed(0)
    args = {
        "qkv_bias": dict(qkv_bias=True),
        "qk_norm": dict(qk_norm=True, init_values=0.1),
        "no_bias": dict(qkv_bias=False, proj_bias=False),
    }.get(kind, {})
    return (Scaled if kind == "subclass" else Block)(48, 3, **args).eval()


@pytest.mark.parametrize("kind", ["qkv_bias", "qk_norm", "no_bias", "subclass"])
def test_prompted_block_equals_plain_block_with_gradients(kind):
    from lpt_core.model import plain_block, prompted_block, supports_prompted_block

    block = make_block(kind)
    assert supports_prompted_block(block) == (kind != "subclass")
    fast = prompted_block if supports_prompted_block(block) else plain_block
    x = torch.randn(3, 9, 48)
    prompts = torch.randn(1, 4, 48).expand(3, -1, -1).contiguous().requires_grad_(True)
    outs, grads = [], []
    for fn in (fast, plain_block):
        out = fn(block, x, prompts)
        (grad,) = torch.autograd.grad(out.square().sum(), prompts)
        outs.append(out)
        grads.append(grad)
    assert outs[0].shape == (3, 9, 48)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_phase2_step_flops_vit_b16_at_most_077_of_plain():
    torch.manual_seed(0)
    model = LPT(build_backbone("vit_base_patch16_224", "random"), 100).set_phase(2).train()
    images = torch.randn(2, 3, 224, 224)

    def step(forward):
        logits, aux = forward(images)
        (logits.sum() - aux["match"]).backward()

    lean = count_flops(lambda: step(model))
    plain = count_flops(lambda: step(lambda x: plain_forward(model, x)))
    ratio = lean / plain
    print(f"ViT-B/16 phase-2 step GFLOP/img: shared trunk {lean / 2e9:.1f}, plain {plain / 2e9:.1f}, ratio {ratio:.3f}")
    assert 0.75 < ratio <= 0.77  # shared trunk 0.807; prompts as keys and values only 0.759
    assert 71.5e9 < lean / 2 < 73e9  # about 72.3 GFLOP per image


def test_parameter_count_vit_b16_paper_sizes():
    model = LPT(build_backbone("vit_base_patch16_224", "random"), 100)
    counts = model.parameter_counts()
    expected = 12 * 10 * 768 + 20 * 6 * 10 * 768 + 20 * 768 + 100 * 768
    assert counts["extra_params"] == expected
    assert 1.0 < counts["extra_percent"] < 1.4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(top_k=5, pool_size=4), "top_k"),
        (dict(group_start=0), "group_start"),
        (dict(group_start=4), "group_start"),
        (dict(prompt_length=0), "prompt_length"),
        (dict(pool_size=0), "pool_size"),
    ],
)
def test_bad_arguments_name_the_field(backbone, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        LPT(backbone, 5, **kwargs)


def test_backbone_without_class_token_is_refused():
    bb = tiny_backbone(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match=r"^backbone:"):
        LPT(bb, 5)
    with pytest.raises(ValueError, match=r"^backbone:"):
        LPT(nn.Linear(3, 3), 5)


def test_any_depth_width_patch():
    bb = tiny_backbone(depth=3, embed_dim=48, num_heads=3, patch_size=4)
    model = LPT(bb, 3, prompt_length=2, pool_size=3, top_k=3, group_start=1).set_phase(2)
    logits, aux = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3) and aux["prompt_idx"].shape == (2, 3)


PHASE1 = ("shared_prompts", "head_weight")


def test_phase1_tensors_do_not_depend_on_the_phase2_shape_before_or_after_phase1(synthetic_data):
    """Shared prompts and class vectors come from generators seeded by (init_seed, component):
    the same whatever pool_size / top_k / group_start and whatever the global RNG holds, and
    phase 1 never reads the phase-2 tensors, so its results are bit-identical too."""
    shapes = [dict(pool_size=8, group_start=2, top_k=2), dict(pool_size=20, group_start=3, top_k=3)]
    init, trained = [], []
    for k, shape in enumerate(shapes):
        backbone = tiny_backbone()
        torch.manual_seed(100 + k)  # another global RNG state each time: the init must not read it
        model = LPT(backbone, 10, prompt_length=4, init_seed=5, **shape)
        init.append({n: v.clone() for n, v in model.prompt_state_dict().items()})
        torch.manual_seed(0)  # what the training itself draws (dropout, crops) is the caller's seed
        Trainer(
            model,
            synthetic_data,
            1,
            PhaseConfig(epochs=1, warmup_epochs=0, batch_size=32, lr=0.5),
            seed=0,
            device="cpu",
            log=None,
        ).fit()  # CPU kernels are deterministic; the claim is about inputs
        trained.append(model.prompt_state_dict())
    for name in PHASE1:
        assert torch.equal(init[0][name], init[1][name]), name
        assert torch.equal(trained[0][name], trained[1][name]), name
        assert not torch.equal(init[0][name], trained[0][name]), name  # phase 1 did train it
    assert init[0]["group_keys"].shape != init[1]["group_keys"].shape


def test_init_seed_sets_the_initial_values_and_not_the_global_rng():
    backbone = tiny_backbone()
    torch.manual_seed(3)
    before = torch.get_rng_state()
    a = LPT(backbone, 6, prompt_length=3, pool_size=4, group_start=2, init_seed=1)
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn from the global generator
    b = LPT.from_config(backbone, 6, LPTConfig(prompt_length=3, pool_size=4, group_start=2), init_seed=1)
    c = LPT(backbone, 6, prompt_length=3, pool_size=4, group_start=2, init_seed=2)
    for name, value in a.prompt_state_dict().items():
        assert torch.equal(value, b.prompt_state_dict()[name]), name
        assert not torch.equal(value, c.prompt_state_dict()[name]), name
    # separate streams: no component repeats another's draws
    assert not torch.equal(a.shared_prompts[0, 0], a.group_prompts[0, 0, 0])
    assert not torch.equal(a.group_keys[0], a.group_prompts[0, 0, 0])
