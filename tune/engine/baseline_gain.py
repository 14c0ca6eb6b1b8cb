"""What a search bought: its best trial against the baseline trial (the profile's own values), by
shot group, on validation (``--confirm N``'s test figures: ``tune.engine.confirmation``).

The figures go to the parent run as metrics: ``baseline_val_*`` (with ``baseline_val_acc_se``, one
binomial standard error) and ``gain_val_*``.
"""

from __future__ import annotations

import math

from tune.config.study import SHOT_KEYS
from tune.config.validation import SE_METRIC, binomial_se
from tune.reports.lines import shots, with_se
from tune.trial.table import COMPLETED, TrialRow


def baseline_row(rows: list[TrialRow]) -> TrialRow | None:
    return next((r for r in rows if r.baseline), None)


def validation_gain(
    best: TrialRow,
    baseline: TrialRow | None,
    params: list[str],
    val_images: int,
    trials: int,
    confirm_command: str | None,
) -> tuple[dict, list[str]]:
    """Parent-run metrics and summary lines of the baseline's validation accuracy (with one
    binomial standard error on ``val_images``) and the best trial's gain over it (points), when
    the baseline ran every epoch. ``confirm_command``: the command that confirms the gain on test
    (None when this search confirms it): the gain line then says it is measured on the images
    the best of ``trials`` was selected on."""
    if baseline is None:
        return {}, []
    head = f"baseline trial {baseline.trial_id} (the profile's values): " + ", ".join(
        f"{p}={baseline.params.get(p)}" for p in params
    )
    if baseline.status != COMPLETED:
        why = baseline.error or f"{baseline.status.replace('_', ' ')} at epoch {baseline.epochs}"
        return {}, [head, f"  {why}: no gain to report"]
    base, top = baseline.metrics(), best.metrics()
    metrics = {f"baseline_val_{k}": base[f"val_{k}"] for k in SHOT_KEYS if math.isfinite(base[f"val_{k}"])}
    metrics[f"baseline_{SE_METRIC}"] = binomial_se(baseline.val_acc, val_images)
    metrics.update(
        {
            f"gain_val_{k}": top[f"val_{k}"] - base[f"val_{k}"]
            for k in SHOT_KEYS
            if math.isfinite(top[f"val_{k}"]) and f"baseline_val_{k}" in metrics
        }
    )
    if baseline.trial_id == best.trial_id:  # every gain is 0
        return metrics, [
            f"baseline trial {baseline.trial_id}: the best trial is the baseline (the profile's "
            "values); no config of the search beat it"
        ]
    lines = [
        head,
        "  validation: " + with_se(base, val_images),
        "  gain of the best: " + shots(metrics, "gain_val_", "{:+.2f}", " points"),
    ]
    if confirm_command is not None:
        lines.append(
            f"  not confirmed: measured on the {val_images:,} validation images the best of {trials} trials "
            f"(one seed each) was selected on, so it is biased upward; confirm it on test with fresh seeds: "
            f"{confirm_command}"
        )
    return metrics, lines
