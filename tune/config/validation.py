"""The split a search selects on: its size and noise floor, the classes it lacks, and the checks
that it is not the test split and that each objective's shot group has images in it.

Every trial is scored on the same validation images with one seed, and the best trial is the
maximum over the budget, so its validation accuracy is biased upward; one binomial standard error
(``binomial_se``) is the least a reader needs to judge a gain. The checks run before Ray starts:
a search whose validation and test splits share images would select on the test split, and an
objective over a shot group with no validation images is NaN for every trial (Optuna records each
as FAIL and the sampler degrades to random).
"""

from __future__ import annotations

import math

from lpt_core.data import val_test_overlap
from lpt_core.metrics import FEW_AT_MOST, MANY_ABOVE, shot_groups
from tune.errors import ConfigError

SE_METRIC, SIZE_METRIC = "val_acc_se", "val_images"  # parent-run metrics next to best_val_acc
SE_WARN = 1.5  # points: the dry run warns when one standard error (at 50%, its largest) exceeds it


def binomial_se(acc_percent: float, n: int) -> float:
    """One standard error of an accuracy (percent) measured on ``n`` images, in points."""
    if n <= 0 or not math.isfinite(acc_percent):
        return math.nan
    p = min(max(acc_percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def _classes(summary, indices: list[int], limit: int = 5) -> str:
    names = summary.class_names
    shown = [f"{c} ({names[c]})" if names and names[c] != str(c) else str(c) for c in indices[:limit]]
    return ", ".join(shown) + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def describe(summary) -> str:
    """The dry run's and the summary's line: size, images per class, the classes it lacks, the
    noise floor. ``summary``: ``lpt_core.data.spec_counts.DataSummary``."""
    counts = summary.val_counts
    if counts is None:
        return "validation: not computed here (the data's lists or files are not here)"
    n = sum(counts)
    present = [k for k in counts if k]
    per_class = (
        f"{present[0]} per class"
        if present and min(present) == max(present)
        else f"{min(present, default=0)}..{max(present, default=0)} per class"
    )
    missing = [c for c, k in enumerate(counts) if k == 0]
    lacks = (
        f"; no image of {len(missing)} class{'es' if len(missing) > 1 else ''}: {_classes(summary, missing)} "
        f"(its accuracy is not measured; the test split has it)"
        if missing
        else ""
    )
    lent = summary.val_from_train or {}
    held = (
        "; "
        + ", ".join(
            f"{k:,} of class {_classes(summary, [c])} held out of its training images (it trains on "
            f"{summary.class_counts[c]:,} of {summary.class_counts[c] + k:,})"
            for c, k in list(lent.items())[:3]
        )
        + (f" and {len(lent) - 3} more classes" if len(lent) > 3 else "")
        if lent and summary.class_counts
        else ""
    )
    se = f"±{binomial_se(90.0, n):.1f} points at 90%, ±{binomial_se(50.0, n):.1f} at 50%" if n else "none"
    worst = binomial_se(50.0, n) if n else math.inf
    warn = (
        f"\nwarning: one standard error of val_acc reaches ±{worst:.1f} points (above {SE_WARN:g}): differences "
        f"between trials smaller than about {2 * worst:.0f} points are noise; raise data.val_per_class"
        if worst > SE_WARN
        else ""
    )
    return f"validation: {n:,} images, {per_class}{held}{lacks}; one standard error of val_acc: {se}{warn}"


def group_rule(group: str, split: str) -> str:
    few = FEW_AT_MOST[split]
    return {
        "many": f"more than {MANY_ABOVE} training images",
        "medium": f"{few + 1}..{MANY_ABOVE} training images",
        "few": f"at most {few} training images",
    }[group]


def check_objectives(metrics: list[str], summary, split: str, dataset: str, where: str) -> None:
    """Each objective (the first also drives early stopping) over a shot group must have
    validation images: ``val_few_acc`` on CIFAR-10-LT at imbalance 100 has no class to average.
    Unchecked where the class counts are not known (a dry run without the data's lists)."""
    train, counts = summary.shot_counts or summary.class_counts, summary.val_counts
    if train is None or counts is None:
        return
    groups = shot_groups(train, split)
    for metric in metrics:
        group = metric.removeprefix("val_").removesuffix("_acc")
        if group not in groups:
            continue
        classes = [c for c, inside in enumerate(groups[group].tolist()) if inside]
        if sum(counts[c] for c in classes) > 0:
            continue
        found = (
            f"its {len(classes)} such class(es) have no validation image"
            if classes
            else f"no class has that many (training images per class: {min(train)}..{max(train)})"
        )
        raise ConfigError(
            f"{where}: objective: {metric} is the accuracy of the {group}-shot classes "
            f"({group_rule(group, split)}, shot_split {split}), but in {dataset} {found}; "
            f"choose another objective or profile"
        )


def check_disjoint(data, dataset: str, where: str) -> None:
    """A search selects on validation and reports test once: the two must not share images.
    ``data`` None (a dry run without the data's lists) is not checked."""
    shared = val_test_overlap(data) if data is not None else 0
    if shared:
        raise ConfigError(
            f"{where}: data: {dataset}'s validation and test splits share {shared:,} images, so the "
            f"search would select on the test split; give it a validation split disjoint from test "
            f"(a val_list that is not the test_list, or a hold-out from train)"
        )
