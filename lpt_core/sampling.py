"""Dual sampling: class-balanced and instance-balanced batches drawn together.

The class-aware sampler picks a class uniformly at random, then takes the next ``per_class`` images
of that class from its own reshuffled cycle (the reference ClassAwareSampler). The instance-balanced
branch is a plain shuffle. ``DualBatchSampler`` yields, for each step, the class-balanced indices
followed by the instance-balanced ones in one list, so a single DataLoader loads one batch of
``2 * batch_size`` images and the model runs both branches as one batch.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _class_index_lists(labels: Sequence[int], num_classes: int) -> list[torch.Tensor]:
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    lists = [torch.nonzero(labels_t == c).flatten() for c in range(num_classes)]
    empty = [c for c, idx in enumerate(lists) if idx.numel() == 0]
    if empty:
        raise ValueError(f"labels: class {empty[0]} has no training images")
    return lists


class ClassAwareSampler:
    """Draws classes uniformly; ``per_class`` consecutive images of each drawn class."""

    def __init__(self, labels: Sequence[int], num_classes: int, per_class: int = 4):
        if per_class < 1:
            raise ValueError(f"per_class: must be >= 1, got {per_class}")
        self.class_indices = _class_index_lists(labels, num_classes)
        self.num_classes, self.per_class = num_classes, per_class

    def draw(self, count: int, generator: torch.Generator) -> Iterator[int]:
        """Yield ``count`` dataset indices."""
        cycles = [idx[torch.randperm(idx.numel(), generator=generator)] for idx in self.class_indices]
        positions = [0] * self.num_classes
        produced = 0
        while produced < count:
            c = int(torch.randint(self.num_classes, (1,), generator=generator))
            for _ in range(self.per_class):
                if positions[c] == cycles[c].numel():
                    idx = self.class_indices[c]
                    cycles[c], positions[c] = idx[torch.randperm(idx.numel(), generator=generator)], 0
                yield int(cycles[c][positions[c]])
                positions[c] += 1
                produced += 1
                if produced == count:
                    return


class DualBatchSampler(Sampler[list[int]]):
    """Per step: ``batch_size`` class-balanced indices then ``batch_size`` shuffled ones.

    An epoch is ``len(labels) // batch_size`` steps (at least one). Call ``set_epoch`` before each
    epoch: the draws depend only on (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, labels: Sequence[int], num_classes: int, batch_size: int,
                 per_class: int = 4, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.class_aware = ClassAwareSampler(labels, num_classes, per_class)
        self.num_images = len(labels)
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.steps = max(1, self.num_images // batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        total = self.steps * self.batch_size
        balanced = list(self.class_aware.draw(total, gen))
        repeats = -(-total // self.num_images)
        shuffled = torch.cat([torch.randperm(self.num_images, generator=gen) for _ in range(repeats)])
        shuffled = shuffled[:total].tolist()
        b = self.batch_size
        for s in range(self.steps):
            yield balanced[s * b:(s + 1) * b] + shuffled[s * b:(s + 1) * b]
