"""Class-aware sampling cycles through the classes as the released sampler does; dual and
instance batches; reproducible per epoch."""

from collections import Counter

import pytest
import torch

from lpt_core.sampling import ClassAwareSampler, DualBatchSampler, InstanceBatchSampler

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
    assert all(len(set(runs[k : k + 4])) == 1 for k in range(0, 400, 4))


@pytest.mark.parametrize("per_class", [1, 4, 3])
def test_each_class_comes_once_per_cycle_of_shuffled_classes(per_class):
    """The released ClassAwareSampler walks a shuffled class list (RandomCycleIter over the
    classes): every cycle of num_classes * per_class draws holds each class exactly per_class
    times, in runs of per_class, and the class order is reshuffled between cycles."""
    sampler = ClassAwareSampler(LABELS, 6, per_class=per_class)
    cycle = 6 * per_class
    draws = [LABELS[i] for i in sampler.draw(cycle * 200 + 5, torch.Generator().manual_seed(2))]
    orders = set()
    for k in range(0, 200 * cycle, cycle):
        block = draws[k : k + cycle]
        assert Counter(block) == {c: per_class for c in range(6)}, (k, block)
        assert all(len(set(block[j : j + per_class])) == 1 for j in range(0, cycle, per_class))
        orders.add(tuple(block[::per_class]))
    assert len(orders) > 100  # 720 possible orders: reshuffled, not one order repeated


def test_class_aware_cycles_through_each_class_before_repeating():
    sampler = ClassAwareSampler(LABELS, 6, per_class=4)
    draws = list(sampler.draw(20000, torch.Generator().manual_seed(1)))
    tail = [i for i in draws if LABELS[i] == 1][:80]  # class 1 has 80 images
    assert sorted(tail) == [i for i, y in enumerate(LABELS) if y == 1]


def released_steps(num_images: int, batch_size: int, loader_batches: int) -> int:
    """The steps of one epoch of the released train_dual_dualloss.py loop, from its code: the
    class-aware loader (max count x classes draws, drop_last) runs until ``cnt > len // batch``."""
    steps = cnt = 0
    for _ in range(loader_batches):
        if cnt > num_images // batch_size:
            break
        cnt += 1
        steps += 1
    return steps


@pytest.mark.parametrize("batch_size", [16, 7, 326, 400])
def test_dual_epochs_run_the_released_loops_step_count(batch_size):
    sampler = DualBatchSampler(LABELS, 6, batch_size=batch_size, per_class=4, seed=5)
    assert len(sampler) == len(list(sampler)) == released_steps(len(LABELS), batch_size, 200 * 6 * 10)


def test_dual_batches_and_epoch_reproducibility():
    sampler = DualBatchSampler(LABELS, 6, batch_size=16, per_class=4, seed=5)
    assert len(sampler) == len(LABELS) // 16 + 1
    sampler.set_epoch(2)
    first = list(sampler)
    assert all(len(b) == 32 for b in first)
    ib = [b[16:] for b in first]
    # each IB batch is the head of a fresh shuffle (the release's next(iter(loader)) per step):
    # distinct within a step, drawn again from all images at the next step
    assert all(len(set(b)) == 16 for b in ib)
    flat = [i for b in ib for i in b]
    assert len(set(flat)) < len(flat) and len(set(flat)) > len(LABELS) / 2
    sampler.set_epoch(3)
    assert list(sampler) != first
    sampler.set_epoch(2)
    assert list(sampler) == first


def test_empty_class_is_an_error():
    with pytest.raises(ValueError, match="class 2"):
        ClassAwareSampler([0, 1, 3], 4)


def test_instance_batches_one_shuffle_per_epoch_and_reproducible():
    sampler = InstanceBatchSampler(LABELS, batch_size=16, seed=5)
    assert len(sampler) == len(LABELS) // 16
    sampler.set_epoch(1)
    first = list(sampler)
    flat = [i for b in first for i in b]
    assert all(len(b) == 16 for b in first) and len(set(flat)) == len(flat) == len(sampler) * 16
    assert flat != sorted(flat)
    sampler.set_epoch(2)
    assert list(sampler) != first
    sampler.set_epoch(1)
    assert list(sampler) == first
    big = InstanceBatchSampler(LABELS[:10], batch_size=16, seed=0)  # batch above the set: one step
    assert len(big) == 1 and len(next(iter(big))) == 16 and set(next(iter(big))) == set(range(10))
