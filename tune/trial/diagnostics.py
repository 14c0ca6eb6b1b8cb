"""The trial report's content: diagnostics from the validation predictions (per class, by shot group,
the shot-group confusion, prompt usage) and its figures. Numbers and files only: the trial logs them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lpt_core.metrics import confusion_counts, group_index, per_class_accuracy, shot_accuracy, shot_confusion_counts


def class_groups(class_counts: Sequence[int], split: str = "standard") -> np.ndarray:
    """Index into ``GROUPS`` (0 many, 1 medium, 2 few) of every class."""
    return group_index(class_counts, split).numpy()


def shot_confusion(preds, labels, class_counts: Sequence[int], split: str = "standard") -> np.ndarray:
    """[3, 3] counts: images of a many/medium/few class (rows) predicted as a class of each group (columns)."""
    preds, labels = (torch.as_tensor(np.asarray(x, dtype=np.int64)) for x in (preds, labels))
    return shot_confusion_counts(preds, labels, group_index(class_counts, split)).numpy()


def prompt_usage(labels, prompt_idx, num_classes: int, pool_size: int) -> np.ndarray:
    """[C, P] counts: how often images of each class selected each group prompt."""
    usage = np.zeros((num_classes, pool_size), dtype=np.int64)
    idx = np.asarray(prompt_idx, dtype=np.int64)
    rows = np.repeat(np.asarray(labels, dtype=np.int64), idx.shape[1])
    np.add.at(usage, (rows, idx.reshape(-1)), 1)
    return usage


def usage_entropy(usage) -> float:
    """Entropy of the pool's usage share per prompt, divided by log(pool size): 1 when every
    prompt is selected equally often, 0 when one prompt takes every selection (or the pool has one)."""
    totals = np.asarray(usage, dtype=np.float64).sum(axis=0)
    if totals.size < 2 or totals.sum() <= 0:
        return 0.0
    p = totals[totals > 0] / totals.sum()
    return float(max(0.0, -(p * np.log(p)).sum() / math.log(totals.size)))


def diagnostics(pred: dict, class_counts: Sequence[int], pool_size: int | None = None, split: str = "standard") -> dict:
    """The diagnostics of ``predict``'s output (every image's prediction): as ``from_evaluation``."""
    preds, labels = pred["preds"], pred["labels"]
    c = len(class_counts)
    correct, total = confusion_counts(preds, labels, c)
    val: dict[str, Any] = dict(shot_accuracy(correct, total, class_counts, split))
    val["per_class"] = per_class_accuracy(correct.double(), total.double()).tolist()
    val["shot_confusion"] = shot_confusion(preds, labels, class_counts, split).tolist()
    if pred.get("prompt_idx") is not None:
        size = pool_size or int(pred["prompt_idx"].max()) + 1
        val["prompt_usage"] = prompt_usage(labels, pred["prompt_idx"], c, size)
    return from_evaluation(val, class_counts, split)


def from_evaluation(val: dict, class_counts: Sequence[int], split: str = "standard") -> dict:
    """Shot accuracy, per-class accuracy, group confusion and prompt usage (with its entropy) from
    what ``lpt_core.evaluate`` returns: the trial report needs no second validation pass."""
    out = {k: v for k, v in val.items() if k != "prompt_usage"}
    out["class_counts"] = [int(n) for n in class_counts]
    out["shot_split"] = split
    if val.get("prompt_usage") is not None:
        usage = np.asarray(val["prompt_usage"], dtype=np.int64)
        out["prompt_usage"] = usage
        out["prompt_usage_entropy"] = usage_entropy(usage)
    return out


def _plain(value):
    """JSON-ready: arrays as lists, NaN as null (strict JSON for any reader)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
