"""``--confirm N`` (issue 29): mean ± SE over the seeds, the paired t-interval of the gain (equal to
scipy's paired t-test interval), the test set's own paired SE (equal to McNemar's for one seed), and
a verdict that says "confirmed" only when the interval excludes 0."""

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from tune.engine.confirmation import (
    CONFIRMED,
    NOT_CONFIRMED,
    ConfirmResults,
    confirm_summary,
    interval,
    paired_test_se,
)
from tune.reports.html import SearchReport, TrialCounts, _verdict
from tune.trial.test_scores import SeedScores

COUNTS = [100, 100, 50, 50, 10, 10]  # two classes per shot group (standard split)


def seed_result(correct: np.ndarray, labels: np.ndarray) -> SeedScores:
    """What ``confirm_seed`` returns for one seed, from per-image outcomes."""
    acc = lambda m: 100.0 * correct[m].mean()
    groups = {"many_acc": labels < 2, "medium_acc": (labels >= 2) & (labels < 4), "few_acc": labels >= 4}
    return SeedScores({"acc": acc(np.ones_like(correct)), **{k: acc(m) for k, m in groups.items()}}, correct, labels)


def runs(p_best: list[float], p_base: list[float], n: int = 3000, seed: int = 0) -> ConfirmResults:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(COUNTS)
    return ConfirmResults(
        best=[seed_result(rng.random(n) < p, labels) for p in p_best],
        baseline=[seed_result(rng.random(n) < p, labels) for p in p_base],
    )


def test_the_seed_interval_is_scipys_paired_t_interval():
    best, base = [84.1, 85.0, 83.7, 84.9, 85.3], [83.0, 84.2, 83.9, 83.5, 84.0]
    gains = [b - a for b, a in zip(best, base)]
    ci = interval(gains, test_se=0.0)
    ref = stats.ttest_rel(best, base).confidence_interval(0.95)
    assert (ci.seed_low, ci.seed_high) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert ci.se == pytest.approx(np.std(gains, ddof=1) / math.sqrt(5))
    assert (ci.low, ci.high) == pytest.approx((ci.seed_low, ci.seed_high))  # no test-set noise
    wide = interval(gains, test_se=0.5)  # the verdict's interval: widened by the test set's SE
    assert wide.high - wide.mean == pytest.approx(stats.t.ppf(0.975, 4) * math.sqrt(ci.se**2 + 0.25))
    assert math.isnan(interval([1.0], 0.1).low)  # one seed: no interval


def test_the_test_sets_paired_se_is_mcnemars_for_one_seed():
    rng = np.random.default_rng(1)
    best, base = rng.random(1000) < 0.8, rng.random(1000) < 0.75
    b, c, n = int((best & ~base).sum()), int((~best & base).sum()), 1000
    mcnemar = 100.0 * math.sqrt(b + c - (b - c) ** 2 / n) / n
    assert paired_test_se(best[None], base[None]) == pytest.approx(mcnemar)
    # several seeds: the per-image difference is averaged over the seeds first
    bs, As = rng.random((3, n)) < 0.8, rng.random((3, n)) < 0.75
    d = bs.mean(0) - As.mean(0)
    assert paired_test_se(bs, As) == pytest.approx(100 * d.std() / math.sqrt(n))


def test_a_clear_gain_is_confirmed_and_a_noisy_one_is_not():
    metrics, tags, lines = confirm_summary(runs([0.9] * 5, [0.6] * 5), COUNTS, "standard", "acc")
    assert tags == {"lpt.confirmation": CONFIRMED}
    assert metrics["confirm_seeds"] == 5 and metrics["confirm_gain_test_acc_low"] > 0
    assert metrics["confirm_test_acc_se"] == pytest.approx(metrics["confirm_test_acc_std"] / math.sqrt(5))
    assert lines[-1].startswith("  verdict: confirmed: the 95% interval with the test set's SE, [+")
    assert "95% paired t-interval over the 5 seeds [+" in lines[-2] and "the test set's own paired SE" in lines[-2]

    metrics, tags, lines = confirm_summary(runs([0.80, 0.81, 0.80], [0.80, 0.80, 0.81]), COUNTS, "standard", "acc")
    assert tags == {"lpt.confirmation": NOT_CONFIRMED}
    assert metrics["confirm_gain_test_acc_low"] < 0 < metrics["confirm_gain_test_acc_high"]
    assert lines[-1].startswith("  verdict: not confirmed: the 95% interval with the test set's SE, [-")
    assert lines[-1].endswith("includes 0")
    # the verdict is on the objective's accuracy (val_few_acc -> test_few_acc)
    _, _, lines = confirm_summary(runs([0.8] * 3, [0.8] * 3, seed=3), COUNTS, "standard", "few_acc")
    assert lines[-2].startswith("  gain in test_few_acc: ")


def test_one_seed_or_no_baseline_is_not_confirmed():
    _, tags, lines = confirm_summary(runs([0.95], [0.5]), COUNTS, "standard", "acc")
    assert tags["lpt.confirmation"] == NOT_CONFIRMED
    assert lines[-1] == "  verdict: not confirmed: one seed gives no interval; run --confirm 5"
    only = ConfirmResults(runs([0.9] * 2, []).best)  # no baseline
    _, tags, lines = confirm_summary(only, COUNTS, "standard", "acc")
    assert tags["lpt.confirmation"] == NOT_CONFIRMED
    assert lines[-1] == "  verdict: not confirmed: the best is the baseline; there is no gain to confirm"


def test_the_report_page_keeps_not_confirmed_when_confirm_metrics_exist():
    info = SearchReport(study="prompt_pool", profile="smoke", counts=TrialCounts(total=6))
    confirm = {"confirm_test_acc_mean": 80.0, "confirm_gain_test_acc_low": -0.4, "confirm_gain_test_acc_high": 1.2}
    [text] = _verdict(replace(info, confirmation=NOT_CONFIRMED), confirm, gain=True)
    assert text.startswith("<p><b>Not confirmed.</b>") and "[-0.40, 1.20]" in text and "--confirm 5" in text
    [text] = _verdict(replace(info, confirmation=CONFIRMED), {**confirm, "confirm_gain_test_acc_low": 0.3}, True)
    assert text.startswith("<p><b>Confirmed.</b>") and "excludes 0" in text
    # metrics from before intervals (no verdict tag): not confirmed
    [text] = _verdict(info, {"confirm_test_acc_mean": 80.0}, True)
    assert text.startswith("<p><b>Not confirmed.</b>") and "no interval was recorded" in text
    [text] = _verdict(info, {}, True)
    assert "biased upward" in text and "--resume --confirm 5" in text


def test_the_test_exposure_ledger_keeps_every_tested_trial(tmp_path):
    """The parent run's ``lpt.test_exposed`` grows with each wrap-up and confirmation (read back
    from the run, so a --resume in a new process keeps it); the lines name the count."""
    from mlflow import MlflowClient

    from tune.engine import test_exposure as exposure

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.create_run(client.create_experiment("ledger")).info.run_id
    assert exposure.exposed(client.get_run(parent).data.tags) == []
    assert exposure.new_best_line([], "t1") is None  # the first best: nothing seen before
    assert exposure.expose(client, parent, ["t1"]) == ["t1"]
    again = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a resumed search: another client
    assert exposure.expose(again, parent, ["t1", "t0"]) == ["t1", "t0"]  # --confirm: best and baseline
    ledger = exposure.exposed(again.get_run(parent).data.tags)
    assert exposure.new_best_line(ledger, "t1") is None  # the same best: no new exposure
    assert exposure.new_best_line(ledger, "t5") == (
        "  test exposure: t5 is a new best; testing it makes 3 configs seen on test (before: t1, t0): "
        "compare them on validation, never by their test numbers"
    )
    assert exposure.expose(again, parent, ["t5"]) == ["t1", "t0", "t5"]
    run = again.get_run(parent)
    assert run.data.tags["lpt.test_exposed"] == "t1,t0,t5" and run.data.metrics["test_configs_seen"] == 3
    assert exposure.seen(["t1", "t0", "t5"]) == "the test split has seen 3 configs of this search (t1, t0, t5)"
    assert exposure.seen(["t1"]) == "the test split has seen 1 config of this search (t1)"


def test_the_test_pass_gives_evaluates_accuracies_and_each_images_outcome(backbone, synthetic_data):
    """``score_test``: the same accuracies as ``lpt_core.evaluate`` in one pass, plus the per-image
    outcome in the test split's order (what the paired SE pairs)."""
    import torch

    from lpt_core import LPT, evaluate
    from tune.config.loading import load_profile
    from tune.trial.test_scores import score_test

    profile = load_profile("smoke")[1]
    model = LPT(backbone, synthetic_data.num_classes, prompt_length=2, pool_size=4, top_k=2, group_start=2)
    out = score_test(profile, model, synthetic_data)
    ref = evaluate(model, synthetic_data.test, synthetic_data.shot_counts, device=torch.device("cpu"))
    for k in ("acc", "many_acc", "medium_acc", "few_acc"):
        assert out[f"test_{k}"] == pytest.approx(ref[k], nan_ok=True)
    labels = [int(y) for _, y in synthetic_data.test]
    assert out["labels"].tolist() == labels and out["correct"].dtype == bool
    assert 100.0 * out["correct"].mean() == pytest.approx(out["test_acc"])
