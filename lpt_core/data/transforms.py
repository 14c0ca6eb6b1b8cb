"""Train and test transforms of LPT (torchvision transforms v2), for PIL images or uint8 tensors.

Train: RandomResizedCrop + horizontal flip; test: resize to size / crop_pct (``eval_resize``:
``square`` resizes the image to a square of that side, as the released LPT code's
``Resize((256, 256))``; ``short_side`` resizes the short side, timm's convention), then center
crop. Both normalised with the backbone's mean and std. Images become uint8 tensors first, so
every input (PIL, tensor, encoded) is resampled by torch alike (the released code resamples PIL
images with PIL: within a grey level of torch's antialiased bilinear). ``InputConfig`` holds
those numbers; its defaults are the released LPT code's (mean 0.5 / std 0.5, bilinear, 256x256
-> 224), ``lpt_core.backbones.input_config`` reads them from a backbone's pretrained config.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field
from torchvision.transforms import v2

from ..config import Section

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
Triple = Annotated[list[float], Field(min_length=3, max_length=3)]
PositiveTriple = Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=3, max_length=3)]
Interpolation = Literal["bilinear", "bicubic"]
EvalResize = Literal["square", "short_side"]


class InputConfig(Section):
    """How images become the model's input: normalisation, resampling and the eval crop ratio."""

    mean: Triple = Field(list(MEAN), description="per-channel mean of [0, 1] pixels (RGB)")
    std: PositiveTriple = Field(list(STD), description="per-channel std (RGB)")
    interpolation: Interpolation = Field("bilinear", description="resampling of the resize and the random crop")
    crop_pct: float = Field(224 / 256, gt=0, le=1, description="eval: resize to size / crop_pct, center-crop size")
    eval_resize: EvalResize = Field(
        "square",
        description="eval: square resizes the whole image to a square "
        "(the released LPT code), short_side keeps the aspect ratio (timm)",
    )

    def resize_size(self, image_size: int) -> int:
        """The side of the eval resize, ``floor(size / crop_pct)`` as timm computes it; at 0.875
        that is the released code's ``size * 8 // 7`` (224 -> 256, 32 -> 36)."""
        return math.floor(image_size / self.crop_pct)

    def eval_resize_to(self, image_size: int) -> int | list[int]:
        """The eval resize as torchvision's ``Resize`` takes it: [side, side] or the short side."""
        side = self.resize_size(image_size)
        return [side, side] if self.eval_resize == "square" else side

    def mode(self) -> v2.InterpolationMode:
        return v2.InterpolationMode(self.interpolation)


class InputOverrides(Section):
    """A profile's ``input`` section: any of ``InputConfig``'s keys, over the backbone's."""

    mean: Triple | None = None
    std: PositiveTriple | None = None
    interpolation: Interpolation | None = None
    crop_pct: float | None = Field(None, gt=0, le=1)
    eval_resize: EvalResize | None = None


RELEASED = InputConfig()  # the released LPT code's input pipeline


def train_transform(image_size: int = 224, cfg: InputConfig = RELEASED) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(image_size, interpolation=cfg.mode(), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ]
    )


def test_transform(image_size: int = 224, cfg: InputConfig = RELEASED) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(cfg.eval_resize_to(image_size), interpolation=cfg.mode(), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ]
    )
