"""The released checkpoint: a model in the released module layout (written here from DongSky/LPT's
phase2_test/PromptModels_pool_eval/structure.py and the timm 0.4 VisionTransformer it subclasses),
saved as the release saves it, gives the same logits once imported by ``lpt_core.released``."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lpt_core.released import load_released, read_state, released_shapes

D, DEPTH, HEADS, PATCH, IMG, L, P, S, C = 128, 4, 2, 8, 32, 3, 5, 2, 7


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2, self.drop = (
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, dim),
            nn.Dropout(0),
        )

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3, bias=True), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C_ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C_ // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C_))


class AdaBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, num_heads)  # nn.LayerNorm: eps 1e-5
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class NormedLinear(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.Tensor(in_features, out_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x):
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


class PromptLearner(nn.Module):
    def __init__(self, num_classes, prompt_length, prompt_depth, prompt_channels, pool_size, pool_blocks):
        super().__init__()
        self.Prompt_Tokens = nn.Parameter(torch.zeros(prompt_depth, prompt_length, prompt_channels))
        self.Prompt_Tokens_pool = nn.Parameter(torch.zeros(pool_size, pool_blocks, prompt_length, prompt_channels))
        self.Prompt_Keys = nn.Parameter(torch.zeros(pool_size, prompt_channels))
        self.head = NormedLinear(prompt_channels, num_classes)

    def forward(self, x):
        return self.head(x)


class PatchEmbed(nn.Module):  # timm 0.4's
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, D, kernel_size=PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ReleasedVPTViT(nn.Module):
    """VPT_ViT of PromptModels_pool_eval: forward_query, forward_features and forward as released."""

    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, (IMG // PATCH) ** 2 + 1, D))
        self.pos_drop = nn.Dropout(0)
        self.blocks = nn.Sequential(*[AdaBlock(D, HEADS) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(D)
        self.pre_logits, self.head = nn.Identity(), nn.Identity()
        self.topk, self.share_blocks = 2, S
        self.dropout = nn.Dropout(0.1)
        self.prompt_learner = PromptLearner(C, L, DEPTH, D, pool_size=P, pool_blocks=DEPTH - S)

    def _embed(self, x):
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_query(self, x):
        x = self._embed(x)
        n = self.prompt_learner.Prompt_Tokens.shape[1]
        for i in range(len(self.blocks)):
            prompts = self.prompt_learner.Prompt_Tokens[i].unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat((x, prompts), dim=1)
            x = self.blocks[i](x)[:, : x.shape[1] - n]
        return self.pre_logits(self.norm(x)[:, 0])

    def forward_features(self, x, query):
        x = self._embed(x)
        query_norm = F.normalize(query)
        prompt_key_norm = F.normalize(self.prompt_learner.Prompt_Keys)
        prompt_sim = (prompt_key_norm @ query_norm.transpose(-1, -2)).transpose(-1, -2)
        scores, topk = prompt_sim.topk(self.topk, 1, True, True)
        batched_prompt = self.prompt_learner.Prompt_Tokens_pool[topk.long(), ...].mean(dim=1)
        matched_sim = prompt_key_norm[topk, ...] * query_norm.unsqueeze(1)
        reduced_sim = matched_sim.sum() / matched_sim.shape[0]
        n = self.prompt_learner.Prompt_Tokens.shape[-2]
        for i in range(len(self.blocks)):
            prompts = self.prompt_learner.Prompt_Tokens[i].unsqueeze(0).expand(x.shape[0], -1, -1)
            if i >= self.share_blocks:
                x = torch.cat((x, prompts, batched_prompt[:, i - self.share_blocks, :, :]), dim=1)
                x = self.blocks[i](x)[:, : x.shape[1] - 2 * n]
            else:
                x = torch.cat((x, prompts), dim=1)
                x = self.blocks[i](x)[:, : x.shape[1] - n]
        return self.pre_logits(self.norm(x)[:, 0]), reduced_sim, topk

    def forward(self, x):
        query = self.forward_query(x)
        x, reduced_sim, topk = self.forward_features(x, query)
        x = self.head(self.prompt_learner(self.dropout(x)))
        return x, reduced_sim, topk


@pytest.fixture(scope="module")
def released():
    torch.manual_seed(0)
    model = ReleasedVPTViT()
    with torch.no_grad():  # every tensor random, so that a misplaced one shows (keys: distinct top-k)
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif not name.endswith("head.weight"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("prefix", ["", "module."])
def test_the_imported_checkpoint_gives_the_released_models_logits(released, tmp_path, prefix):
    """Saved as the release saves it (with DataParallel's ``module.`` or without), imported with
    every size read from the tensors: the same logits (max abs difference printed), the same
    matching term and the same chosen prompts."""
    path = tmp_path / "LPT_tiny.pth"
    state = {prefix + k: v for k, v in released.state_dict().items()}
    torch.save({"config": {"name": "tiny", "epochs": 90}, "state_dict": state, "val_acc": 50.0}, path)
    model, shapes = load_released(path)
    assert (shapes.depth, shapes.width, shapes.num_heads, shapes.patch_size, shapes.image_size) == (
        DEPTH,
        D,
        HEADS,
        PATCH,
        IMG,
    )
    assert (shapes.prompt_length, shapes.pool_size, shapes.group_start, shapes.num_classes) == (L, P, S, C)
    assert shapes.mlp_ratio == 4 and shapes.qkv_bias
    images = torch.randn(16, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, want_match, want_idx = released(images)
        got, aux = model(images)
    diff = float((got - want).abs().max())
    print(f"released vs imported logits: max abs difference {diff:.2e} (cosines in [-1, 1])")
    assert diff < 1e-5
    assert torch.equal(aux["prompt_idx"], want_idx) and len(set(want_idx[:, 0].tolist())) > 1
    assert float(aux["match"]) == pytest.approx(float(want_match), abs=1e-5)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_the_layernorm_eps_is_the_releases(released):
    """The release's ViT normalises with eps 1e-5 (nn.LayerNorm), timm's with 1e-6: the import keeps 1e-5."""
    model, _ = load_released(released.state_dict())
    assert {m.eps for m in model.backbone.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}


def test_bad_checkpoints_are_named(released, tmp_path):
    state = released.state_dict()
    with pytest.raises(ValueError, match=r"not a released LPT checkpoint \(no 'prompt_learner.Prompt_Keys'\)"):
        released_shapes({k: v for k, v in state.items() if "Prompt_Keys" not in k})
    odd = dict(state, pos_embed=torch.zeros(1, 18, D))
    with pytest.raises(ValueError, match="pos_embed holds 18 tokens"):
        released_shapes(odd)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk.pth: not a torch checkpoint"):
        read_state(tmp_path / "junk.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth: expected \{'state_dict'"):
        read_state(tmp_path / "other.pth")
    assert math.isqrt(17 - 1) == 4  # the grid rule: a class token and a 4 x 4 grid


def test_predict_released_prints_the_released_models_accuracy_by_released_shot_groups(released, tmp_path, capsys):
    """``tune/predict.py --released FILE --profile P --split test``: the accuracy of the released
    model itself on that split (computed here with the released layout), by the release's groups."""
    from lpt_core.data import build_dataset
    from lpt_core.metrics import shot_accuracy
    from tune.config.loading import load_profile
    from tune.predict import main

    path = tmp_path / "LPT_tiny.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in released.state_dict().items()}}, path)
    sets = [f"data.num_classes={C}", "data.max_per_class=150"]
    argv = ["--released", str(path), "--profile", "smoke", "--split", "test", "--device", "cpu"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    data = build_dataset({**load_profile("smoke", sets)[1].data.model_dump(), "image_size": IMG})
    images = torch.stack([data.test[i][0] for i in range(len(data.test))])
    labels = torch.tensor(data.test.labels)
    with torch.no_grad():
        preds = released(images)[0].argmax(1)
    correct = torch.bincount(labels[preds == labels], minlength=C)
    want = shot_accuracy(correct, torch.bincount(labels, minlength=C), data.class_counts, "released")
    assert out[0].startswith(f"released checkpoint {path}: ViT depth {DEPTH}, width {D} ({HEADS} heads), patch {PATCH}")
    assert all(0 <= want[k] <= 100 for k in ("many_acc", "medium_acc", "few_acc"))  # all three groups exist
    print("\n".join(out))
    assert out[1].startswith(f"test (released shot groups: few <= 20): {want['acc']:.2f}% ± ")
    assert out[1].endswith(
        f"(many {want['many_acc']:.2f} / medium {want['medium_acc']:.2f} / few {want['few_acc']:.2f})"
    )


def test_predict_released_needs_a_profile_and_a_split(tmp_path, capsys):
    from tune.predict import main

    assert main(["--released", str(tmp_path / "x.pth"), "--split", "test"]) == 2
    assert "--released: give --profile" in capsys.readouterr().err
    assert main(["--released", str(tmp_path / "x.pth"), "--profile", "smoke", "--split", "test"]) == 2
    assert "x.pth: no such file" in capsys.readouterr().err
