"""Accuracy overall and by shot group: many (>100 train images), medium (20..100), few (<20)."""

from __future__ import annotations

from typing import Sequence

import torch

MANY_ABOVE, FEW_BELOW = 100, 20


def shot_groups(class_counts: Sequence[int]) -> dict[str, torch.Tensor]:
    """Boolean class masks for the many / medium / few groups from train class counts."""
    counts = torch.as_tensor(list(class_counts))
    return {"many": counts > MANY_ABOVE, "medium": (counts >= FEW_BELOW) & (counts <= MANY_ABOVE),
            "few": counts < FEW_BELOW}


def per_class_accuracy(correct: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Percent correct per class; NaN for a class with no evaluation images."""
    return torch.where(total > 0, 100.0 * correct / total.clamp(min=1), torch.nan)


def shot_accuracy(correct: torch.Tensor, total: torch.Tensor,
                  class_counts: Sequence[int]) -> dict[str, float]:
    """``acc`` (over all images) and ``many_acc`` / ``medium_acc`` / ``few_acc`` (over the images
    of that group's classes, as the reference code counts them; NaN for an empty group)."""
    correct, total = correct.double().cpu(), total.double().cpu()
    out = {"acc": float(100.0 * correct.sum() / total.sum().clamp(min=1))}
    for name, mask in shot_groups(class_counts).items():
        n = total[mask].sum()
        out[f"{name}_acc"] = float(100.0 * correct[mask].sum() / n) if n > 0 else float("nan")
    return out


def confusion_counts(preds: torch.Tensor, targets: torch.Tensor,
                     num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (correct, total) counts on the predictions' device, with no host sync."""
    # index_add_ instead of bincount / boolean masks, which read sizes back from the device
    total = torch.zeros(num_classes, dtype=torch.long, device=targets.device)
    total.index_add_(0, targets, torch.ones_like(targets))
    correct = torch.zeros_like(total).index_add_(0, targets, (preds == targets).long())
    return correct, total
