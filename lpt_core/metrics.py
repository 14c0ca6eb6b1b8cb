"""Accuracy overall and by shot group of the training class counts.

Two splits: ``standard`` (many > 100 train images, medium 20..100, few < 20; the paper's tables)
and ``released`` (the released LPT evaluation script's: few <= 20, medium 21..100), to compare with
the released checkpoints' numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MANY_ABOVE = 100
FEW_AT_MOST = {"standard": 19, "released": 20}  # the largest train count that is still "few"
SHOT_SPLITS = tuple(FEW_AT_MOST)


def few_at_most(split: str = "standard") -> int:
    if split not in FEW_AT_MOST:
        raise ValueError(f"shot_split: must be one of {', '.join(SHOT_SPLITS)}, got {split!r}")
    return FEW_AT_MOST[split]


def shot_groups(class_counts: Sequence[int], split: str = "standard") -> dict[str, torch.Tensor]:
    """Boolean class masks for the many / medium / few groups from train class counts."""
    counts, few = torch.as_tensor(list(class_counts)), few_at_most(split)
    return {"many": counts > MANY_ABOVE, "medium": (counts > few) & (counts <= MANY_ABOVE), "few": counts <= few}


GROUPS = ("many", "medium", "few")


def group_index(class_counts: Sequence[int], split: str = "standard") -> torch.Tensor:
    """Index into ``GROUPS`` (0 many, 1 medium, 2 few) of every class."""
    masks = shot_groups(class_counts, split)
    out = torch.zeros(len(class_counts), dtype=torch.long)
    for g, name in enumerate(GROUPS):
        out[masks[name]] = g
    return out


def per_class_accuracy(correct: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Percent correct per class; NaN for a class with no evaluation images."""
    return torch.where(total > 0, 100.0 * correct / total.clamp(min=1), torch.nan)


def shot_accuracy(
    correct: torch.Tensor, total: torch.Tensor, class_counts: Sequence[int], split: str = "standard"
) -> dict[str, float]:
    """``acc`` (over all images) and ``many_acc`` / ``medium_acc`` / ``few_acc`` (over the images
    of that group's classes, as the reference code counts them; NaN for an empty group)."""
    correct, total = correct.double().cpu(), total.double().cpu()
    out = {"acc": float(100.0 * correct.sum() / total.sum().clamp(min=1))}
    for name, mask in shot_groups(class_counts, split).items():
        n = total[mask].sum()
        out[f"{name}_acc"] = float(100.0 * correct[mask].sum() / n) if n > 0 else float("nan")
    return out


def shot_confusion_counts(preds: torch.Tensor, targets: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """[3, 3] counts on the predictions' device: images of a many/medium/few class (rows, ``group``:
    ``group_index`` of every class) predicted as a class of each group (columns)."""
    k = len(GROUPS)
    flat = torch.zeros(k * k, dtype=torch.long, device=targets.device)
    flat.index_add_(0, group[targets] * k + group[preds], torch.ones_like(targets))
    return flat.view(k, k)


def confusion_counts(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (correct, total) counts on the predictions' device, with no host sync."""
    # index_add_ instead of bincount / boolean masks, which read sizes back from the device
    total = torch.zeros(num_classes, dtype=torch.long, device=targets.device)
    total.index_add_(0, targets, torch.ones_like(targets))
    correct = torch.zeros_like(total).index_add_(0, targets, (preds == targets).long())
    return correct, total
