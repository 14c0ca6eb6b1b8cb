"""A deterministic synthetic long-tailed dataset that a tiny ViT can learn, for smoke runs and tests.

Each class has a colour and a stripe orientation/frequency; each image is its class pattern with a
random phase, brightness and noise drawn from a generator seeded by (seed, split, index), so the
same spec always gives the same pixels without storing any. With ``families: F`` the classes fall
into F visual families (class c in family c % F): one colour per family, the classes of a family
told apart by their stripes only.

Keys and defaults: ``specs.SyntheticSpec``.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from .base import LTData
from .common import assemble, input_mode
from .profile import long_tail_counts
from .transforms import RELEASED

_SPLIT_SALT = {"train": 0, "val": 1, "test": 2}


class SyntheticImages(Dataset):
    """uint8 images [3, S, S] made on the fly; ``labels[i]`` is the class of image i."""

    def __init__(
        self,
        labels: list[int],
        num_classes: int,
        image_size: int,
        seed: int,
        split: str,
        transform=None,
        families: int = 0,
    ):
        self.labels, self.num_classes, self.image_size = labels, num_classes, image_size
        self.seed, self.salt, self.transform = seed, _SPLIT_SALT[split], transform
        g = torch.Generator().manual_seed(seed)
        self.colors = torch.rand(num_classes, 3, generator=g) * 0.8 + 0.1
        self.angles = torch.rand(num_classes, generator=g) * math.pi
        self.freqs = 1.0 + torch.rand(num_classes, generator=g) * 3.0
        self.families = families
        if families:
            self.colors = self.colors[torch.arange(num_classes) % families]
        coords = torch.linspace(0, 1, image_size)
        self.yy, self.xx = torch.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        c = self.labels[index]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.salt) * 10_000_019 + index)
        phase, brightness = torch.rand(2, generator=g)
        direction = self.xx * math.cos(self.angles[c]) + self.yy * math.sin(self.angles[c])
        stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * (self.freqs[c] * direction + phase))
        img = self.colors[c].view(3, 1, 1) * (0.6 + 0.4 * stripes) * (0.8 + 0.4 * brightness)
        img = img + 0.08 * torch.randn(3, self.image_size, self.image_size, generator=g)
        return (img.clamp(0, 1) * 255).to(torch.uint8)

    @property
    def fingerprint(self) -> str:
        """What fixes the pixels besides labels and index (for the manifest hash)."""
        families = f":families={self.families}" if self.families else ""
        return f"synthetic:{self.seed}:{self.salt}:{self.num_classes}:{self.image_size}{families}"

    def __getitem__(self, index: int):
        img = self.image(index)
        return (self.transform(img) if self.transform else img), self.labels[index]


def build_synthetic(s, input_cfg=RELEASED) -> LTData:
    """``synthetic`` from a ``specs.SyntheticSpec``."""
    num_classes, max_per_class = s.num_classes, s.max_per_class
    counts = long_tail_counts(max_per_class, num_classes, s.imbalance_ratio)
    if min(counts) < 1:
        raise ValueError("data.max_per_class: too small for this imbalance_ratio (a class gets 0 images)")
    per_val, per_test, families = s.val_per_class, s.test_per_class, s.families
    train_labels = [c for c, n in enumerate(counts) for _ in range(n)]
    val_labels = [c for c in range(num_classes) for _ in range(per_val)]
    test_labels = [c for c in range(num_classes) for _ in range(per_test)]
    make = lambda labels, split: SyntheticImages(labels, num_classes, s.image_size, s.seed, split, families=families)
    return assemble(
        make(train_labels, "train"),
        make(val_labels, "val"),
        make(test_labels, "test"),
        [f"class_{c:03d}" for c in range(num_classes)],
        s.image_size,
        input_mode(s, "gpu_augment"),
        input_cfg=input_cfg,
    )
