"""A-GCL against hand computations; the noise cloud; the branch weight."""

import math

import pytest
import torch
import torch.nn.functional as F

from lpt_core.losses import AsymmetricGCL, branch_weight

COUNTS = [500, 120, 40, 9, 3]


def test_noise_off_equals_hand_computation():
    torch.manual_seed(0)
    cos = torch.rand(6, 5) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = AsymmetricGCL(
        COUNTS, margin=0.1, scale=20.0, noise_mul=0.0, gamma_pos=0.5, gamma_neg=4.0, label_smoothing=0.1
    )(cos, y)
    expected = 0.0
    for i in range(6):
        z = [20.0 * (float(cos[i, j]) - (0.1 if j == y[i] else 0.0)) for j in range(5)]
        log_z = math.log(sum(math.exp(v) for v in z))
        for j in range(5):
            log_p = z[j] - log_z
            p = math.exp(log_p)
            weight = (1 - p) ** 0.5 if j == y[i] else p**4.0
            target = 0.9 + 0.1 / 5 if j == y[i] else 0.1 / 5
            expected -= target * weight * log_p
    assert float(loss) == pytest.approx(expected / 6, rel=1e-5)


def test_zero_gammas_no_smoothing_is_cross_entropy_with_margin():
    cos = torch.rand(8, 5) * 2 - 1
    y = torch.randint(0, 5, (8,))
    loss = AsymmetricGCL(
        COUNTS, margin=0.2, scale=16.0, noise_mul=0.0, gamma_pos=0.0, gamma_neg=0.0, label_smoothing=0.0
    )(cos, y)
    expected = F.cross_entropy(16.0 * (cos - 0.2 * F.one_hot(y, 5)), y)
    torch.testing.assert_close(loss, expected)


def test_noise_cloud_grows_towards_the_tail_and_is_seedable():
    gen = torch.Generator().manual_seed(3)
    loss_fn = AsymmetricGCL(COUNTS, margin=0.0, scale=1.0, noise_mul=0.5, generator=gen)
    cos = torch.zeros(20000, 5)
    y = torch.zeros(20000, dtype=torch.long)
    cloud = -loss_fn.gcl_logits(cos, y)  # noise_mul * |N(0,1/3)|.clamp * amplitude >= 0
    assert float(cloud[:, 0].abs().max()) == 0.0  # the most frequent class: no noise
    assert float(cloud.min()) >= 0 and float(cloud.max()) <= 0.5
    means = cloud.mean(0)
    assert all(means[j] < means[j + 1] for j in range(4))
    # E|N(0, 1/3)| = (1/3) sqrt(2/pi); the rarest class has amplitude 1
    assert float(means[4]) == pytest.approx(0.5 * (1 / 3) * math.sqrt(2 / math.pi), rel=0.03)
    gen.manual_seed(3)
    torch.testing.assert_close(-loss_fn.gcl_logits(cos, y), cloud)


def test_noise_hits_the_target_logit_too_as_the_released_agcl():
    """The released AGCL subtracts the cloud from the whole cosine matrix, target column included."""
    gen = torch.Generator().manual_seed(5)
    loss_fn = AsymmetricGCL(COUNTS, margin=0.0, scale=1.0, noise_mul=0.5, generator=gen)
    y = torch.full((1000,), 4, dtype=torch.long)  # every image of the rarest class
    cloud = -loss_fn.gcl_logits(torch.zeros(1000, 5), y)
    assert float(cloud[:, 4].min()) >= 0 and float(cloud[:, 4].mean()) > 0.1  # its own target is clouded


def test_bad_class_counts():
    with pytest.raises(ValueError, match="^class_counts"):
        AsymmetricGCL([10, 0, 3])


def test_branch_weight():
    assert branch_weight(0, 10) == 0.5
    assert branch_weight(5, 10) == 0.25
    assert branch_weight(10, 10) == 0.0
    assert branch_weight(12, 10) == 0.0
