"""Train and test transforms of LPT (torchvision transforms v2), for PIL images or uint8 tensors.

Train: RandomResizedCrop + horizontal flip; test: resize to size*256/224, center crop; both
normalised with mean 0.5 / std 0.5 (DESIGN.md).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def train_transform(image_size: int = 224) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def test_transform(image_size: int = 224, mean=MEAN, std=STD) -> v2.Compose:
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(int(round(image_size * 256 / 224)), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])
