"""The input pipeline follows the backbone: mean, std, interpolation and eval crop from its
pretrained config (``lpt_core.backbones.input_config``), on the CPU and the on-device paths. The
paper's augreg ViT-B keeps exactly the released LPT numbers; a DINO ViT gets ImageNet statistics
and bicubic resampling. Backbones are built on the meta device: no weights are needed."""

import pytest
import torch
from PIL import Image
from tiny_profile import SMALL_SYNTHETIC
from torchvision import transforms as T
from torchvision.transforms import v2

from lpt_core.backbones import input_config
from lpt_core.data import BatchTransform, build_dataset
from lpt_core.data.transforms import RELEASED, InputConfig, train_transform
from lpt_core.data.transforms import test_transform as eval_transform

AUGREG = {"name": "vit_base_patch16_224.augreg_in21k", "weights": "pretrained"}
DINO = {"name": "vit_small_patch16_224.dino", "weights": "pretrained"}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SYNTH = SMALL_SYNTHETIC
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def released_eval(size: int) -> T.Compose:
    """The released LPT code's ``val_transforms`` (train_dual_dualloss.py, eval_phase2.py) in
    torchvision's v1 transforms, as it wrote them: ``Resize((size * 8 // 7, size * 8 // 7))``,
    ``CenterCrop((size, size))``, ``ToTensor()``, ``Normalize`` 0.5 / 0.5."""
    side = size * 8 // 7
    return T.Compose(
        [T.Resize((side, side)), T.CenterCrop((size, size)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    )


def short_side_eval(size: int) -> T.Compose:
    """timm's evaluation at crop_pct 0.875 written the same way: the short side to size * 8 // 7."""
    return T.Compose([T.Resize(size * 8 // 7), T.CenterCrop(size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


def non_square_image(height: int, width: int, noise: int = 0) -> Image.Image:
    """A PIL RGB image with structure in both directions (two waves and a gradient), plus uniform
    noise of +-``noise`` grey levels (0: smooth, where resamplers that differ only in filter
    support agree within about a grey level)."""
    yy, xx = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    pixels = torch.stack(
        [128 + 100 * torch.sin(xx / 9), 128 + 100 * torch.cos(yy / 13), (xx + yy) * 255 / (height + width)]
    )
    pixels = pixels + torch.randint(-noise, noise + 1, pixels.shape, generator=torch.Generator().manual_seed(0))
    return Image.fromarray(pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


def assert_same_chain(ours: v2.Compose, theirs: T.Compose, other: T.Compose, image: Image.Image) -> None:
    """``ours`` turns the image into a uint8 tensor first and resamples with torch; ``theirs``
    (torchvision v1, as the released code wrote it) resamples the PIL image with PIL. They differ
    by at most one grey level (torch's antialiased bilinear against PIL's, rounding), on a small
    share of the values; ``other`` (the other eval resize) differs by far more."""
    level = 2 / 255  # one grey level after normalising with std 0.5
    got = ours(image)
    diff = (got - theirs(image)).abs()
    assert got.shape == (3, 224, 224) and diff.max() <= level * 1.001 and diff.mean() < 0.01 * level
    assert (got - other(image)).abs().mean() > 10 * level


def test_augreg_vit_b_keeps_the_released_numbers():
    cfg = input_config(AUGREG)
    assert (
        cfg
        == RELEASED
        == InputConfig(mean=[0.5] * 3, std=[0.5] * 3, interpolation="bilinear", crop_pct=0.875, eval_resize="square")
    )
    assert [cfg.resize_size(s) for s in (224, 384, 32)] == [s * 8 // 7 for s in (224, 384, 32)] == [256, 438, 36]
    # a non-square PIL image, as the released datasets load them
    assert_same_chain(
        eval_transform(224, cfg), released_eval(224), short_side_eval(224), non_square_image(375, 500, noise=15)
    )
    # the on-device path (run here on CPU tensors) agrees up to bilinear rounding
    image = non_square_image(300, 410)
    raw = v2.functional.pil_to_tensor(image)
    out = BatchTransform(224, train=False, cfg=cfg)(raw[None])[0]
    want = released_eval(224)(image)
    assert (out - want).abs().max() < 4 / 255  # 2 grey levels (normalised to [-1, 1])
    on_device_short_side = BatchTransform(224, train=False, cfg=cfg.model_copy(update={"eval_resize": "short_side"}))
    assert (on_device_short_side(raw[None])[0] - want).abs().mean() > 10 / 255  # the two resizes differ here
    synth = build_dataset({**SYNTH, "gpu_augment": True}, cfg).val
    batch = torch.stack([synth[i][0] for i in range(len(synth))])  # uint8 images of the synthetic set
    out = BatchTransform(32, train=False, cfg=cfg)(batch)
    assert (out - torch.stack([eval_transform(32, cfg)(b) for b in batch])).abs().max() < 2 / 255 + 1e-4
    # the on-device normalisation of mean/std 0.5 is x * 2/255 - 1 to the bit, as before
    t, x = BatchTransform(8, train=False, cfg=cfg), torch.arange(256.0).expand(3, 1, 256)
    assert torch.equal(x.mul(t.mul).sub(t.sub), x.mul(2.0 / 255).sub(1.0))


def test_eval_resize_short_side_keeps_the_aspect_ratio():
    cfg = RELEASED.model_copy(update={"eval_resize": "short_side"})
    assert_same_chain(
        eval_transform(224, cfg), short_side_eval(224), released_eval(224), non_square_image(375, 500, noise=15)
    )
    image = non_square_image(300, 410)
    want = short_side_eval(224)(image)
    out = BatchTransform(224, train=False, cfg=cfg)(v2.functional.pil_to_tensor(image)[None])[0]
    assert (out - want).abs().max() < 4 / 255
    assert input_config(DINO).eval_resize == "short_side"
    assert input_config(DINO, {"eval_resize": "square"}).eval_resize == "square"
    with pytest.raises(ValueError, match=r"^input.eval_resize: must be one of square, short_side, got 'crop'"):
        input_config(AUGREG, {"eval_resize": "crop"})


def test_dino_vit_gets_imagenet_statistics_and_bicubic():
    cfg = input_config(DINO)
    assert cfg.mean == pytest.approx(IMAGENET_MEAN) and cfg.std == pytest.approx(IMAGENET_STD)
    assert cfg.interpolation == "bicubic" and cfg.crop_pct == pytest.approx(0.9) and cfg.resize_size(32) == 35
    data = build_dataset(SYNTH, cfg)
    assert data.input_cfg == cfg
    raw = build_dataset({**SYNTH, "gpu_augment": True}, cfg).val[1][0]  # uint8, untransformed
    want = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(35, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(32),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )(raw)
    assert torch.allclose(data.val[1][0], want, atol=1e-6)
    assert not torch.allclose(build_dataset(SYNTH).val[1][0], want, atol=1e-2)  # the released pipeline differs


@pytest.mark.parametrize("device", DEVICES)
def test_dino_vit_on_the_device_path_matches_the_cpu_path(device):
    cfg = input_config(DINO)
    gpu = build_dataset({**SYNTH, "gpu_augment": True}, cfg)
    cpu = build_dataset(SYNTH, cfg)
    raw = torch.stack([gpu.val[i][0] for i in range(len(gpu.val))]).to(device)
    out = gpu.eval_batch_transform(raw)
    assert out.device.type == device and out.shape == (len(gpu.val), 3, 32, 32)
    want = torch.stack([cpu.val[i][0] for i in range(len(cpu.val))])
    assert (out.cpu() - want).abs().max() < 1e-3
    torch.manual_seed(0)
    train = gpu.train_batch_transform(raw)
    lo = (0 - max(IMAGENET_MEAN)) / min(IMAGENET_STD)
    hi = (1 - min(IMAGENET_MEAN)) / min(IMAGENET_STD)
    assert train.shape == out.shape and lo - 1e-4 <= train.min() and train.max() <= hi + 1e-4
    assert train.min() < -1.2  # ImageNet statistics, not mean/std 0.5 ([-1, 1])


def test_train_transform_uses_the_interpolation():
    cfg = input_config(DINO)
    steps = {type(t).__name__: t for t in train_transform(32, cfg).transforms}
    assert steps["RandomResizedCrop"].interpolation == v2.InterpolationMode.BICUBIC
    assert list(steps["Normalize"].mean) == pytest.approx(IMAGENET_MEAN)


def test_a_profile_input_section_overrides_the_backbone():
    cfg = input_config(DINO, {"crop_pct": 1.0, "interpolation": "bilinear"})
    assert cfg.crop_pct == 1.0 and cfg.interpolation == "bilinear" and cfg.mean == pytest.approx(IMAGENET_MEAN)
    with pytest.raises(ValueError, match=r"^input.crop_pct: must be <= 1, got 2"):
        input_config(DINO, {"crop_pct": 2.0})
