"""Class-aware sampling is uniform over classes; dual batches; reproducible per epoch."""

from collections import Counter

import pytest
import torch

from lpt_core.sampling import ClassAwareSampler, DualBatchSampler

LABELS = [c for c, n in enumerate([200, 80, 30, 10, 4, 2]) for _ in range(n)]


def test_class_aware_draws_classes_uniformly():
    sampler = ClassAwareSampler(LABELS, 6, per_class=4)
    draws = list(sampler.draw(60000, torch.Generator().manual_seed(0)))
    counts = Counter(LABELS[i] for i in draws)
    expected = len(draws) / 6
    chi2 = sum((counts[c] - expected) ** 2 / expected for c in range(6))
    # draws come in runs of 4, so the chi-square of single draws is ~4x its df; 5 df, p=0.001 -> 20.5
    assert chi2 / 4 < 20.5, counts
    runs = [LABELS[i] for i in draws[:400]]
    assert all(len(set(runs[k:k + 4])) == 1 for k in range(0, 400, 4))


def test_class_aware_cycles_through_each_class_before_repeating():
    sampler = ClassAwareSampler(LABELS, 6, per_class=4)
    draws = list(sampler.draw(20000, torch.Generator().manual_seed(1)))
    tail = [i for i in draws if LABELS[i] == 1][:80]   # class 1 has 80 images
    assert sorted(tail) == [i for i, y in enumerate(LABELS) if y == 1]


def test_dual_batches_and_epoch_reproducibility():
    sampler = DualBatchSampler(LABELS, 6, batch_size=16, per_class=4, seed=5)
    assert len(sampler) == len(LABELS) // 16
    sampler.set_epoch(2)
    first = list(sampler)
    assert all(len(b) == 32 for b in first)
    ib = [i for b in first for i in b[16:]]
    assert len(set(ib)) == len(ib)  # one pass of a shuffle: no repeats within an epoch
    sampler.set_epoch(3)
    assert list(sampler) != first
    sampler.set_epoch(2)
    assert list(sampler) == first


def test_empty_class_is_an_error():
    with pytest.raises(ValueError, match="class 2"):
        ClassAwareSampler([0, 1, 3], 4)
