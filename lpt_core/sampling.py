"""Batch samplers of a phase: dual (class-balanced and instance-balanced together) or instance only.

The class-aware sampler is the released ClassAwareSampler's cycling: it walks a shuffled list of
the classes (each class once per cycle, the list reshuffled when a cycle ends) and for each class
takes the next ``per_class`` images from that class's own image cycle (reshuffled whenever it runs
out). So every block of ``num_classes * per_class`` draws from an epoch's start holds each class
exactly ``per_class`` times. The instance-balanced draws are a plain shuffle.

``DualBatchSampler`` yields, for each step, the class-balanced indices followed by the
instance-balanced ones in one list, so a single DataLoader loads one batch of ``2 * batch_size``
images and the model runs both branches as one batch. It runs the released loop's epoch:
``len(train) // batch_size + 1`` steps (the release breaks once its counter exceeds
``len // batch``), and each instance-balanced batch is the first ``batch_size`` of a fresh shuffle
(the release calls ``next(iter(train_loader_ibs))`` at every step: a new shuffled iterator), so
the IB images of one step are distinct but steps draw independently, with replacement across
steps. ``InstanceBatchSampler`` (``sampling: instance``, not in the release) yields
``len // batch_size`` batches of one shuffle, one pass per epoch. Both draw from a generator seeded
by (seed, epoch) only, so a resumed run sees the same batches; unlike the released iterators, the
class-aware cycles restart every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _class_index_lists(labels: Sequence[int], num_classes: int) -> list[torch.Tensor]:
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    lists = [torch.nonzero(labels_t == c).flatten() for c in range(num_classes)]
    empty = [c for c, idx in enumerate(lists) if idx.numel() == 0]
    if empty:
        raise ValueError(f"labels: class {empty[0]} has no training images")
    return lists


class _Cycle:
    """``items`` in a shuffled order, reshuffled each time they have all been given (the released
    ``RandomCycleIter``, with a seeded generator)."""

    def __init__(self, items: torch.Tensor, generator: torch.Generator):
        self.items, self.generator = items, generator
        self.order, self.position = self._shuffled(), 0

    def _shuffled(self) -> list[int]:
        return self.items[torch.randperm(self.items.numel(), generator=self.generator)].tolist()

    def __next__(self) -> int:
        if self.position == len(self.order):
            self.order, self.position = self._shuffled(), 0
        self.position += 1
        return self.order[self.position - 1]


class ClassAwareSampler:
    """Cycles through the classes in shuffled order; ``per_class`` consecutive images of each."""

    def __init__(self, labels: Sequence[int], num_classes: int, per_class: int = 4):
        if per_class < 1:
            raise ValueError(f"per_class: must be >= 1, got {per_class}")
        self.class_indices = _class_index_lists(labels, num_classes)
        self.num_classes, self.per_class = num_classes, per_class

    def draw(self, count: int, generator: torch.Generator) -> Iterator[int]:
        """Yield ``count`` dataset indices."""
        images = [_Cycle(idx, generator) for idx in self.class_indices]
        classes = _Cycle(torch.arange(self.num_classes), generator)
        for produced in range(count):
            if produced % self.per_class == 0:
                current = images[next(classes)]
            yield next(current)


def shuffled_indices(num_images: int, count: int, generator: torch.Generator) -> list[int]:
    """``count`` indices of a shuffle of ``range(num_images)``, reshuffled whenever it runs out."""
    repeats = -(-count // num_images)
    return torch.cat([torch.randperm(num_images, generator=generator) for _ in range(repeats)])[:count].tolist()


def steps_per_epoch(num_images: int, batch_size: int, sampling: str) -> int:
    """Optimiser steps in one epoch: the released loop's ``num_images // batch_size + 1`` for
    ``dual``, one pass of a shuffle (``num_images // batch_size``, at least 1) for ``instance``."""
    return num_images // batch_size + 1 if sampling == "dual" else max(1, num_images // batch_size)


class _EpochBatchSampler(Sampler[list[int]]):
    """``steps_per_epoch`` steps per epoch; ``set_epoch`` before each epoch: the draws depend only
    on (seed, epoch)."""

    sampling = "instance"

    def __init__(self, labels: Sequence[int], batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.num_images = len(labels)
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.steps = steps_per_epoch(self.num_images, batch_size, self.sampling)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)


class DualBatchSampler(_EpochBatchSampler):
    """Per step: ``batch_size`` class-balanced indices, then the first ``batch_size`` of a fresh
    shuffle of the training set (the released loop's ``next(iter(train_loader_ibs))``)."""

    sampling = "dual"

    def __init__(self, labels: Sequence[int], num_classes: int, batch_size: int, per_class: int = 4, seed: int = 0):
        super().__init__(labels, batch_size, seed)
        self.class_aware = ClassAwareSampler(labels, num_classes, per_class)

    def __iter__(self) -> Iterator[list[int]]:
        gen = self.generator()
        total, b = self.steps * self.batch_size, self.batch_size
        balanced = list(self.class_aware.draw(total, gen))
        for s in range(self.steps):
            yield balanced[s * b : (s + 1) * b] + shuffled_indices(self.num_images, b, gen)


class InstanceBatchSampler(_EpochBatchSampler):
    """Per step: ``batch_size`` indices of a plain shuffle (one pass per epoch where it fits)."""

    def __iter__(self) -> Iterator[list[int]]:
        shuffled = shuffled_indices(self.num_images, self.steps * self.batch_size, self.generator())
        b = self.batch_size
        for s in range(self.steps):
            yield shuffled[s * b : (s + 1) * b]
