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


def interval(gains: list[float], test_se: float) -> dict:
    """The paired t-interval over seeds and the verdict's interval, widened by ``test_se``."""
    mean, sd, se = mean_se(gains)
    t = t_quantile(len(gains))
    wide = t * math.sqrt(se**2 + (test_se if math.isfinite(test_se) else 0.0) ** 2)
    return {
        "mean": mean,
        "se": se,
        "t": t,
        "seed_low": mean - t * se,
        "seed_high": mean + t * se,
        "low": mean - wide,
        "high": mean + wide,
    }


def verdict(ci: dict) -> str:
    return CONFIRMED if math.isfinite(ci["low"]) and ci["low"] > 0 else NOT_CONFIRMED


def _outcomes(runs: list[dict]) -> np.ndarray:
    return np.stack([np.asarray(r["correct"], dtype=bool) for r in runs])


def confirm_summary(results: dict[str, list[dict]], class_counts, shot_split: str, key: str) -> tuple[dict, dict, list]:
    """``results``: ``score_test``'s output per seed for ``best`` and (when it is another config)
    ``baseline``, in the same seed order; ``key`` (``acc``, ``few_acc``, ...): the accuracy the
    verdict is on (the objective's). Returns the parent run's metrics, its tags and the summary lines."""
    n = len(results["best"])
    metrics: dict = {"confirm_seeds": n}
    groups = {"confirm_": results["best"]}
    if "baseline" in results:
        groups["confirm_baseline_"] = results["baseline"]
    for prefix, per_seed in groups.items():
        for k in SHOT_KEYS:
            mean, sd, se = mean_se([r[f"test_{k}"] for r in per_seed])
            metrics.update({f"{prefix}test_{k}_mean": mean, f"{prefix}test_{k}_std": sd, f"{prefix}test_{k}_se": se})
    images = len(results["best"][0]["correct"])
    lines = [
        f"  confirmation over {n} fresh seed{'s' * (n > 1)} on the test split ({images:,} images; mean ± SE, "
        f"SE = sd/√{n}):"
    ]
    labels = {"confirm_": "best", "confirm_baseline_": "baseline"}
    for prefix in groups:
        lines.append(f"    {labels[prefix] + ':':9} " + _row(metrics, f"{prefix}test_", "{:.2f}"))
    if "baseline" not in results:
        no_base = results.get("no_baseline")
        why = "no baseline ran every epoch to compare with" if no_base else "the best is the baseline"
        line = f"  verdict: {NOT_CONFIRMED}: {why}; there is no gain to confirm"
        return metrics, {names.CONFIRMATION: NOT_CONFIRMED}, [*lines, line]
    best, base = _outcomes(results["best"]), _outcomes(results["baseline"])
    labels_of = np.asarray(results["best"][0]["labels"])
    masks = {"acc": np.ones(images, dtype=bool)}
    for name, cls in shot_groups(class_counts, shot_split).items():
        masks[f"{name}_acc"] = cls.numpy()[labels_of]
    for k in SHOT_KEYS:
        gains = [b[f"test_{k}"] - a[f"test_{k}"] for b, a in zip(results["best"], results["baseline"])]
        if not all(math.isfinite(g) for g in gains):
            continue
        m = masks[k]
        test_se = paired_test_se(best[:, m], base[:, m])
        ci = interval(gains, test_se)
        metrics.update(
            {
                f"confirm_gain_test_{k}_mean": ci["mean"],
                f"confirm_gain_test_{k}_se": ci["se"],
                f"confirm_gain_test_{k}_test_se": test_se,
                f"confirm_gain_test_{k}_seed_low": ci["seed_low"],
                f"confirm_gain_test_{k}_seed_high": ci["seed_high"],
                f"confirm_gain_test_{k}_low": ci["low"],
                f"confirm_gain_test_{k}_high": ci["high"],
            }
        )
    lines.append(f"    {'gain:':9} " + _row(metrics, "confirm_gain_test_", "{:+.2f}") + "  (paired by seed)")
    if f"confirm_gain_test_{key}_mean" not in metrics:
        key = "acc"
    g = {s: metrics[f"confirm_gain_test_{key}_{s}"] for s in ("mean", "se", "test_se", "seed_low", "seed_high")}
    b = float((best & ~base).sum(axis=1).mean())  # discordant images, per seed on average
    c = float((~best & base).sum(axis=1).mean())
    ci = {"low": metrics[f"confirm_gain_test_{key}_low"], "high": metrics[f"confirm_gain_test_{key}_high"]}
    result = verdict(ci)
    lines.append(
        f"  gain in test_{key}: {g['mean']:+.2f} points; 95% paired t-interval over the {n} seeds "
        + (
            f"[{g['seed_low']:+.2f}, {g['seed_high']:+.2f}] (t({n - 1}) = {t_quantile(n):.2f} x SE {g['se']:.2f})"
            if n > 1
            else "none (one seed has no spread)"
        )
        + f"; the test set's own paired SE {g['test_se']:.2f} (discordant images per seed: best right and "
        f"baseline wrong {b:.1f}, the reverse {c:.1f})"
    )
    if n < 2:
        why = f"one seed gives no interval; run --confirm {DEFAULT_SEEDS}"
    elif result == CONFIRMED:
        why = f"the 95% interval with the test set's SE, [{ci['low']:+.2f}, {ci['high']:+.2f}], excludes 0"
    else:
        side = "includes 0" if ci["high"] >= 0 else "lies below 0: the baseline is better"
        why = f"the 95% interval with the test set's SE, [{ci['low']:+.2f}, {ci['high']:+.2f}], {side}"
    lines.append(f"  verdict: {result}: {why}")
    return metrics, {names.CONFIRMATION: result}, lines


def _row(metrics: dict, prefix: str, fmt: str) -> str:
    shown = []
    for k in SHOT_KEYS:
        mean, se = metrics.get(f"{prefix}{k}_mean", math.nan), metrics.get(f"{prefix}{k}_se", math.nan)
        name = k.removesuffix("_acc") if k != "acc" else "acc"
        shown.append(f"{name} {fmt.format(mean)}" + (f" ± {se:.2f}" if math.isfinite(se) else ""))
    return ", ".join(shown)


def timed_confirm_seed(setup: SearchSetup, config: dict, seed: int) -> tuple[dict, float]:
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
    configs = {"best": config}
    base = (
        {p: baseline.params[p] for p in plan.study.space.params()}
        if baseline is not None and baseline.status == COMPLETED
        else None
    )
    if base is not None and base != config:
        configs["baseline"] = base
    print(
        f"confirming the best config{' and the baseline' if len(configs) > 1 else ''} with seeds {seeds} ...",
        flush=True,
    )
    task = on_resources(timed_confirm_seed, plan.profile)
    pending = {name: [task.remote(setup, c, s) for s in seeds] for name, c in configs.items()}
    timed = {name: ray.get(refs) for name, refs in pending.items()}
    results: dict = {name: [out for out, _ in runs] for name, runs in timed.items()}
    seconds = sum(s for runs in timed.values() for _, s in runs)
    results["no_baseline"] = base is None
    key = objective_of(plan.study.objective)[0][0].removeprefix("val_")
    metrics, tags, lines = confirm_summary(results, plan.data.shot_counts, plan.profile.shot_split, key)
    tested = [best_id, *([baseline.trial_id] if "baseline" in configs and baseline is not None else [])]
    ledger = exposure.expose(MlflowClient(setup.tracking_uri), setup.parent_run_id, tested)
    lines[0] = f"{lines[0].removesuffix(':')}; {exposure.seen(ledger)}:"
    return metrics, tags, lines, seconds
