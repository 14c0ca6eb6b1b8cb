"""The trial report's content: diagnostics from the validation predictions (per class, by shot group,
the shot-group confusion, prompt usage) and its figures. Numbers and files only: the trial logs them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lpt_core.metrics import confusion_counts, group_index, per_class_accuracy, shot_accuracy, shot_confusion_counts
from tune.config.study import SHOT_KEYS


@dataclass(frozen=True)
class Diagnostics:
    """A trial's validation diagnostics: ``evaluation`` the numbers as ``lpt_core.evaluate`` gives
    them (shot accuracies, ``per_class``, ``shot_confusion``, ...; in its order, without the prompt
    usage), the train class counts and shot split, and the prompt usage ([C, P] counts) with its
    entropy when the model has a pool."""

    evaluation: dict[str, Any]
    class_counts: list[int]
    shot_split: str
    prompt_usage: np.ndarray | None = None
    prompt_usage_entropy: float | None = None

    def shot(self) -> dict[str, float]:
        """``acc``, ``many_acc``, ``medium_acc``, ``few_acc``."""
        return {k: self.evaluation[k] for k in SHOT_KEYS}

    @property
    def per_class(self) -> list[float]:
        return self.evaluation["per_class"]

    @property
    def shot_confusion(self) -> list[list[int]]:
        return self.evaluation["shot_confusion"]

    def numbers(self) -> dict[str, Any]:
        """Every number, keyed as ``val_diagnostics.json`` holds them, in its order."""
        out = dict(self.evaluation)
        out.update(class_counts=self.class_counts, shot_split=self.shot_split)
        if self.prompt_usage is not None:
            out.update(prompt_usage=self.prompt_usage, prompt_usage_entropy=self.prompt_usage_entropy)
        return out


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


def diagnostics(
    pred: dict, class_counts: Sequence[int], pool_size: int | None = None, split: str = "standard"
) -> Diagnostics:
    """The diagnostics of ``predict``'s output (every image's prediction): as ``from_evaluation``."""
    preds, labels, idx = pred["preds"], pred["labels"], pred.get("prompt_idx")
    c = len(class_counts)
    correct, total = confusion_counts(preds, labels, c)
    val: dict[str, Any] = dict(shot_accuracy(correct, total, class_counts, split))
    val.update(
        per_class=per_class_accuracy(correct.double(), total.double()).tolist(),
        shot_confusion=shot_confusion(preds, labels, class_counts, split).tolist(),
    )
    if idx is not None:
        val.update(prompt_usage=prompt_usage(labels, idx, c, pool_size or int(idx.max()) + 1))
    return from_evaluation(val, class_counts, split)


def from_evaluation(val: dict, class_counts: Sequence[int], split: str = "standard") -> Diagnostics:
    """Shot accuracy, per-class accuracy, group confusion and prompt usage (with its entropy) from
    what ``lpt_core.evaluate`` returns: the trial report needs no second validation pass."""
    evaluation = {k: v for k, v in val.items() if k != "prompt_usage"}
    counts = [int(n) for n in class_counts]
    usage = val.get("prompt_usage")  # lpt_core.evaluate's key
    if usage is None:
        return Diagnostics(evaluation, counts, split)
    usage = np.asarray(usage, dtype=np.int64)
    return Diagnostics(evaluation, counts, split, usage, usage_entropy(usage))


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
