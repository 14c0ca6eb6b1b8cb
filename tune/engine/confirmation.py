"""``--confirm N``: the best config and the baseline retrained with the same N fresh seeds and tested,
the gain paired by seed, and one verdict.

Two sources of noise: the seeds (phase 1, phase 2, the crops) and the test images themselves. The
seeds' is the paired t-interval of the gain over seeds (``mean ± t(0.975, N-1) · sd/√N``); the test
set's is the paired standard error of the per-image difference (each image: best right minus
baseline right, averaged over the seeds; for one seed this is McNemar's, from the discordant counts
b and c: ``√(b + c - (b - c)²/n) / n``). The verdict's interval is the t-interval widened by the
test set's SE (``mean ± t · √(SE_seeds² + SE_test²)``, conservative: the per-image spread holds
some seed noise too): ``confirmed`` only when it excludes 0 on the side of a gain, ``not confirmed``
otherwise (one seed gives no interval). The summary, the parent run (tag ``lpt.confirmation``,
metrics ``confirm_*``) and ``summary.html`` say the same.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import ray
from mlflow import MlflowClient
from scipy import stats

from lpt_core.metrics import shot_groups
from tune import names
from tune.config.loading import objective_of
from tune.config.study import SHOT_KEYS
from tune.engine import test_exposure as exposure
from tune.engine.tuner import on_resources
from tune.trial.setup import SearchSetup
from tune.trial.table import COMPLETED, TrialRow
from tune.trial.test_scores import SeedScores
from tune.trial.trainable import confirm_seed

DEFAULT_SEEDS = 5  # what the "not confirmed" lines suggest
LEVEL = 0.95
CONFIRMED, NOT_CONFIRMED = "confirmed", "not confirmed"


def mean_se(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and standard error (sd/√N; NaN for one value)."""
    n = len(values)
    sd = statistics.stdev(values) if n > 1 else math.nan
    return statistics.fmean(values), sd, sd / math.sqrt(n)


def t_quantile(n: int, level: float = LEVEL) -> float:
    """Two-sided quantile of Student's t with N-1 degrees of freedom (NaN for one seed)."""
    return float(stats.t.ppf(0.5 + level / 2, n - 1)) if n > 1 else math.nan


def paired_test_se(best_correct: np.ndarray, base_correct: np.ndarray) -> float:
    """The test set's own standard error (points) of the mean gain: ``[N seeds, n images]`` bool
    arrays of the same images in the same order; the per-image difference averaged over seeds."""
    d = best_correct.astype(np.float64).mean(axis=0) - base_correct.astype(np.float64).mean(axis=0)
    n = d.size
    return 100.0 * float(d.std()) / math.sqrt(n) if n > 1 else math.nan


@dataclass(frozen=True)
class GainInterval:
    """The paired t-interval of the gain over seeds (``seed_low``, ``seed_high``: ``mean ± t · se``)
    and the verdict's, widened by the test set's own SE ``test_se`` (``low``, ``high``)."""

    mean: float
    se: float
    t: float
    test_se: float
    seed_low: float
    seed_high: float
    low: float
    high: float

    def metrics(self, key: str) -> dict[str, float]:
        """The parent run's ``confirm_gain_test_<key>_*`` metrics (the one place they are named)."""
        values = {
            "mean": self.mean,
            "se": self.se,
            "test_se": self.test_se,
            "seed_low": self.seed_low,
            "seed_high": self.seed_high,
            "low": self.low,
            "high": self.high,
        }
        return {f"confirm_gain_test_{key}_{name}": v for name, v in values.items()}


@dataclass(frozen=True)
class ConfirmResults:
    """The seeds' test passes (``confirm_seed``), in the same seed order: ``best``'s and, when it is
    another config, ``baseline``'s; ``no_baseline``: no baseline ran every epoch to compare with."""

    best: list[SeedScores]
    baseline: list[SeedScores] | None = None
    no_baseline: bool = False


def interval(gains: list[float], test_se: float) -> GainInterval:
    """The paired t-interval over seeds and the verdict's interval, widened by ``test_se``."""
    mean, sd, se = mean_se(gains)
    t = t_quantile(len(gains))
    wide = t * math.sqrt(se**2 + (test_se if math.isfinite(test_se) else 0.0) ** 2)
    return GainInterval(mean, se, t, test_se, mean - t * se, mean + t * se, mean - wide, mean + wide)


def verdict(ci: GainInterval) -> str:
    return CONFIRMED if math.isfinite(ci.low) and ci.low > 0 else NOT_CONFIRMED


def _outcomes(runs: list[SeedScores]) -> np.ndarray:
    return np.stack([np.asarray(r.correct, dtype=bool) for r in runs])


def confirm_summary(results: ConfirmResults, class_counts, shot_split: str, key: str) -> tuple[dict, dict, list]:
    """``results``: the seeds' test passes for ``best`` and (when it is another config)
    ``baseline``, in the same seed order; ``key`` (``acc``, ``few_acc``, ...): the accuracy the
    verdict is on (the objective's). Returns the parent run's metrics, its tags and the summary lines."""
    n = len(results.best)
    metrics: dict = {"confirm_seeds": n}
    groups = {
        "confirm_": results.best,
        **({"confirm_baseline_": results.baseline} if results.baseline is not None else {}),
    }
    for prefix, per_seed in groups.items():
        for k in SHOT_KEYS:
            mean, sd, se = mean_se([r.test[k] for r in per_seed])
            metrics.update({f"{prefix}test_{k}_mean": mean, f"{prefix}test_{k}_std": sd, f"{prefix}test_{k}_se": se})
    images = len(results.best[0].correct)
    lines = [
        f"  confirmation over {n} fresh seed{'s' * (n > 1)} on the test split ({images:,} images; mean ± SE, "
        f"SE = sd/√{n}):"
    ]
    labels = {"confirm_": "best", "confirm_baseline_": "baseline"}
    for prefix in groups:
        lines.append(f"    {labels[prefix] + ':':9} " + _row(metrics, f"{prefix}test_", "{:.2f}"))
    if results.baseline is None:
        why = "no baseline ran every epoch to compare with" if results.no_baseline else "the best is the baseline"
        line = f"  verdict: {NOT_CONFIRMED}: {why}; there is no gain to confirm"
        return metrics, {names.CONFIRMATION: NOT_CONFIRMED}, [*lines, line]
    best, base = _outcomes(results.best), _outcomes(results.baseline)
    labels_of = np.asarray(results.best[0].labels)
    masks = {"acc": np.ones(images, dtype=bool)}
    for name, cls in shot_groups(class_counts, shot_split).items():
        masks[f"{name}_acc"] = cls.numpy()[labels_of]
    cis: dict[str, GainInterval] = {}
    for k in SHOT_KEYS:
        gains = [b.test[k] - a.test[k] for b, a in zip(results.best, results.baseline)]
        if not all(math.isfinite(g) for g in gains):
            continue
        m = masks[k]
        cis[k] = interval(gains, paired_test_se(best[:, m], base[:, m]))
        metrics.update(cis[k].metrics(k))
    lines.append(f"    {'gain:':9} " + _row(metrics, "confirm_gain_test_", "{:+.2f}") + "  (paired by seed)")
    if key not in cis:
        key = "acc"
    ci = cis[key]
    b = float((best & ~base).sum(axis=1).mean())  # discordant images, per seed on average
    c = float((~best & base).sum(axis=1).mean())
    result = verdict(ci)
    lines.append(
        f"  gain in test_{key}: {ci.mean:+.2f} points; 95% paired t-interval over the {n} seeds "
        + (
            f"[{ci.seed_low:+.2f}, {ci.seed_high:+.2f}] (t({n - 1}) = {t_quantile(n):.2f} x SE {ci.se:.2f})"
            if n > 1
            else "none (one seed has no spread)"
        )
        + f"; the test set's own paired SE {ci.test_se:.2f} (discordant images per seed: best right and "
        f"baseline wrong {b:.1f}, the reverse {c:.1f})"
    )
    if n < 2:
        why = f"one seed gives no interval; run --confirm {DEFAULT_SEEDS}"
    elif result == CONFIRMED:
        why = f"the 95% interval with the test set's SE, [{ci.low:+.2f}, {ci.high:+.2f}], excludes 0"
    else:
        side = "includes 0" if ci.high >= 0 else "lies below 0: the baseline is better"
        why = f"the 95% interval with the test set's SE, [{ci.low:+.2f}, {ci.high:+.2f}], {side}"
    lines.append(f"  verdict: {result}: {why}")
    return metrics, {names.CONFIRMATION: result}, lines


def _row(metrics: dict, prefix: str, fmt: str) -> str:
    shown = []
    for k in SHOT_KEYS:
        mean, se = metrics.get(f"{prefix}{k}_mean", math.nan), metrics.get(f"{prefix}{k}_se", math.nan)
        name = k.removesuffix("_acc") if k != "acc" else "acc"
        shown.append(f"{name} {fmt.format(mean)}" + (f" ± {se:.2f}" if math.isfinite(se) else ""))
    return ", ".join(shown)


def timed_confirm_seed(setup: SearchSetup, config: dict, seed: int) -> tuple[SeedScores, float]:
    """``confirm_seed`` and the task's wall seconds (what the cost budget counts)."""
    started = time.perf_counter()
    return confirm_seed(setup, config, seed), time.perf_counter() - started


def confirm(
    plan, setup: SearchSetup, best_id: str, config: dict, baseline: TrialRow | None, n: int
) -> tuple[dict, dict, list[str], float]:
    """Retrain the best config (trial ``best_id``), and the baseline's when it ran every epoch and
    is another config, with the same ``n`` fresh seeds (all at once, as Ray tasks); both go into
    the test-exposure ledger. Returns ``confirm_summary``'s metrics, tags and lines, and the
    seeds' wall seconds summed (``budget_ledger.add_confirmation``)."""
    seeds = [plan.profile.seed + 1000 + i for i in range(n)]
    base = (
        {p: baseline.params[p] for p in plan.study.space.params()}
        if baseline is not None and baseline.status == COMPLETED
        else None
    )
    configs = [config, *([base] if base is not None and base != config else [])]  # best, baseline
    print(
        f"confirming the best config{' and the baseline' if len(configs) > 1 else ''} with seeds {seeds} ...",
        flush=True,
    )
    task = on_resources(timed_confirm_seed, plan.profile)
    pending = [[task.remote(setup, c, s) for s in seeds] for c in configs]
    timed = [ray.get(refs) for refs in pending]
    scores = [[out for out, _ in runs] for runs in timed]
    seconds = sum(s for runs in timed for _, s in runs)
    results = ConfirmResults(scores[0], scores[1] if len(scores) > 1 else None, no_baseline=base is None)
    key = objective_of(plan.study.objective)[0][0].removeprefix("val_")
    metrics, tags, lines = confirm_summary(results, plan.data.shot_counts, plan.profile.shot_split, key)
    tested = [best_id, *([baseline.trial_id] if results.baseline is not None and baseline is not None else [])]
    ledger = exposure.expose(MlflowClient(setup.tracking_uri), setup.parent_run_id, tested)
    lines[0] = f"{lines[0].removesuffix(':')}; {exposure.seen(ledger)}:"
    return metrics, tags, lines, seconds
