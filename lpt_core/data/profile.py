"""The long-tailed profile: n_i = int(n_max * (1 / rho) ** (i / (C - 1)))."""

from __future__ import annotations


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float) -> list[int]:
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio: must be >= 1, got {imbalance_ratio}")
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imbalance_ratio) ** (i / (num_classes - 1))) for i in range(num_classes)]
