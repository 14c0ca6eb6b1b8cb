"""Figures and reports (tune/trial/report.py, tune/reports/search.py, tune/report.py): fast
tests on small fabricated searches with real arrays, tables and a real MLflow store; one slow
test on the session's finished smoke search (conftest.py)."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from smoke_search import TRIALS as SMOKE_TRIALS
from smoke_search import runs_of, search_env
from tiny_profile import tiny_profile

from tune import names
from tune import report as report_cli
from tune import tracking as mt
from tune.config.space import Space
from tune.reports import search as search_report
from tune.trial import diagnostics, figures
from tune.trial import report as trial_report
from tune.trial.table import TrialRow, trial_row, write_table

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
SPACE = {
    "pool_size": {"type": "int", "low": 4, "high": 40, "step": 2},
    "top_k": {"type": "int", "low": 1, "high": 4},
    "group_start": {"type": "int", "low": 2, "high": 10},
    "lr": {"type": "float", "low": 0.002, "high": 0.2, "log": True},
    "prompt_length": {"type": "choice", "values": [5, 10, 20]},
}
SPECS = Space.model_validate(SPACE).params()  # the space as the report reads it
PROFILE = tiny_profile(phase1={"epochs": 2}, phase2={"epochs": 4, "lr": 0.5})


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def zipf_counts(num_classes: int, n_max: int = 500, ratio: float = 100.0) -> list[int]:
    return [int(n_max * ratio ** (-i / (num_classes - 1))) for i in range(num_classes)]


# ============================================================================ per trial
def test_shot_confusion_and_usage_entropy_by_hand():
    counts = [300, 150, 60, 30, 10, 5]  # many, many, medium, medium, few, few
    labels = [0, 0, 1, 2, 3, 4, 5, 5]
    preds = [0, 4, 1, 0, 3, 5, 2, 5]
    m = diagnostics.shot_confusion(preds, labels, counts)
    assert m.tolist() == [
        [2, 0, 1],  # many: 0->0, 0->4 (few), 1->1
        [1, 1, 0],  # medium: 2->0 (many), 3->3
        [0, 1, 2],
    ]  # few: 4->5, 5->2 (medium), 5->5
    usage = diagnostics.prompt_usage([0, 1, 1], [[0, 1], [1, 2], [1, 3]], 2, 4)
    assert usage.tolist() == [[1, 1, 0, 0], [0, 2, 1, 1]]
    assert diagnostics.usage_entropy(np.ones((3, 8))) == pytest.approx(1.0)
    assert diagnostics.usage_entropy([[0, 5, 0, 0], [0, 7, 0, 0]]) == 0.0
    assert diagnostics.usage_entropy([[4]]) == 0.0
    half = diagnostics.usage_entropy([[1, 1, 0, 0]])  # two of four prompts used equally
    assert half == pytest.approx(0.5)


def fabricated_diagnostics(num_classes=30, pool=10, seed=0) -> dict:
    """A realistic validation pass: Zipf train counts, 20 val images per class, head classes more
    accurate, tail images often predicted as head classes, prompts clustered by frequency."""
    rng = np.random.default_rng(seed)
    counts = zipf_counts(num_classes)
    labels = np.repeat(np.arange(num_classes), 20)
    p_ok = np.interp(np.log(counts), [np.log(min(counts)), np.log(max(counts))], [0.3, 0.95])[labels]
    wrong = rng.integers(0, max(1, num_classes // 3), size=labels.size)  # mistakes go to head classes
    preds = np.where(rng.random(labels.size) < p_ok, labels, wrong)
    centre = (labels * pool // num_classes)[:, None]
    idx = (centre + rng.integers(0, 2, size=(labels.size, 2)) * np.array([0, 1])) % pool
    pred = {"preds": torch.as_tensor(preds), "labels": torch.as_tensor(labels), "prompt_idx": torch.as_tensor(idx)}
    return trial_report.diagnostics(pred, counts, pool)


def test_trial_figures_are_valid_pngs_with_their_numbers(tmp_path):
    diag = fabricated_diagnostics()
    phase1 = {"acc": 61.0, "many_acc": 90.5, "medium_acc": 58.0, "few_acc": 20.0}
    files = trial_report.write_trial_figures(diag, tmp_path, phase1, [f"class {i}" for i in range(30)], "epoch 4")
    names = sorted(p.name for p in files)
    assert names == [
        "per_class_accuracy.png",
        "prompt_usage.png",
        "shot_accuracy.png",
        "shot_confusion.png",
        "val_diagnostics.json",
    ]
    for path in files[:-1]:
        w, h = png_size(path)
        assert 300 < w < 2500 and 200 < h < 2500 and path.stat().st_size < 300_000
    numbers = json.loads((tmp_path / "val_diagnostics.json").read_text())
    assert numbers["phase1"] == phase1 and numbers["groups"] == ["many", "medium", "few"]
    assert len(numbers["per_class"]) == 30 and np.sum(numbers["shot_confusion"]) == 600
    assert sum(numbers["prompt_usage_per_prompt"]) == 600 * 2
    assert 0 < numbers["prompt_usage_entropy"] < 1
    # no phase-1 metrics (a phase-1 run that is gone) and an empty group: still drawn
    png_size(
        figures.plot_shot_bars(
            {"acc": 50.0, "many_acc": 60.0, "medium_acc": math.nan, "few_acc": 20.0}, None, tmp_path / "no_phase1.png"
        )
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real MLflow sqlite store (artifacts beside it, as searches make them)."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return folder, uri, MlflowClient(uri)


def test_log_trial_report_logs_figures_and_entropy(store, backbone):
    from lpt_core import LPT, PhaseConfig, Trainer, evaluate
    from lpt_core.data import build_dataset

    _, uri, client = store
    synthetic_data = build_dataset(
        {
            "name": "synthetic",
            "num_classes": 10,
            "imbalance_ratio": 50,
            "max_per_class": 150,
            "val_per_class": 6,
            "test_per_class": 1,
            "seed": 0,
        }
    )
    assert {n > 100 for n in synthetic_data.class_counts} == {True, False} and min(synthetic_data.class_counts) < 20
    exp = mt.experiment_id(client, "trial_report", uri)
    p1 = client.create_run(exp, tags={names.ROLE: "phase1", names.PHASE1_KEY: "k1"}).info.run_id
    for epoch, acc in ((1, 40.0), (2, 55.0)):
        mt.log(
            client,
            p1,
            metrics={"val_acc": acc, "val_many_acc": acc + 20, "val_medium_acc": acc, "val_few_acc": acc - 30},
            step=epoch,
        )
    run = client.create_run(exp, tags={names.ROLE: "trial"}).info.run_id
    model = LPT(backbone, synthetic_data.num_classes, prompt_length=2, pool_size=4, top_k=2, group_start=2)
    trainer = Trainer(model, synthetic_data, 2, PhaseConfig(epochs=1, batch_size=8), device="cpu", log=None)
    trainer.epoch = 1
    lines = []
    metrics = trial_report.log_trial_report(client, run, trainer, exp, "k1", lines.append)
    assert 0.0 <= metrics["prompt_usage_entropy"] <= 1.0 and metrics["extra_params"] > 0
    logged = client.get_run(run).data.metrics
    assert logged["prompt_usage_entropy"] == pytest.approx(metrics["prompt_usage_entropy"])
    assert [m.step for m in client.get_metric_history(run, "prompt_usage_entropy")] == [1]
    arts = {a.path for a in client.list_artifacts(run, "report")}
    assert arts == {
        f"report/{n}"
        for n in (
            "per_class_accuracy.png",
            "shot_accuracy.png",
            "shot_confusion.png",
            "prompt_usage.png",
            "val_diagnostics.json",
        )
    }
    local = Path(client.download_artifacts(run, "report/val_diagnostics.json", str(store[0])))
    assert json.loads(local.read_text())["phase1"] == {
        "acc": 55.0,
        "many_acc": 75.0,
        "medium_acc": 55.0,
        "few_acc": 25.0,
    }  # the phase-1 run's last epoch
    assert lines and lines[0].startswith("report: validation figures logged")

    # the report's own validation pass counts exactly what lpt_core.evaluate counts
    ref = evaluate(
        model,
        synthetic_data.val,
        synthetic_data.class_counts,
        loader=trainer.val_loader,
        batch_transform=synthetic_data.eval_batch_transform,
    )
    diag = json.loads(local.read_text())
    for k in ("acc", "many_acc", "medium_acc", "few_acc"):
        assert diag[k] == pytest.approx(ref[k], nan_ok=True)
    assert diag["per_class"] == pytest.approx(ref["per_class"], nan_ok=True)
    assert diag["prompt_usage"] == ref["prompt_usage"].tolist()
    assert diag["prompt_usage_per_prompt"] == ref["prompt_usage"].sum(0).tolist()
    assert np.sum(diag["shot_confusion"]) == len(synthetic_data.val) == 60
    assert diag["prompt_usage_entropy"] == pytest.approx(diagnostics.usage_entropy(ref["prompt_usage"].numpy()))
    assert ref["shot_confusion"] == diag["shot_confusion"]  # evaluate counts the group confusion too

    # after an epoch, the report takes the trainer's last validation pass: the same numbers, no second pass
    trainer.last_eval = ref
    trainer.val_loader = None  # a second pass would fail
    again = client.create_run(exp, tags={names.ROLE: "trial"}).info.run_id
    assert trial_report.log_trial_report(client, again, trainer, exp, "k1", lines.append) == metrics
    reused = Path(client.download_artifacts(again, "report/val_diagnostics.json", str(store[0] / "again")))
    assert json.loads(reused.read_text()) == diag

    # a broken trainer costs the figures, not the trial
    bad = client.create_run(exp).info.run_id
    assert trial_report.log_trial_report(client, bad, object(), exp, "k1", lines.append) == {}
    assert "AttributeError" in client.get_run(bad).data.tags["lpt.report_error"]


# ============================================================================ per search
def fabricated_rows(n=9, seed=0, stopped=(2, 6), failed=(4,)) -> list[dict]:
    """trials.parquet rows as the trial table writes them: completed, stopped early, failed."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pool = int(rng.integers(2, 21)) * 2
        config = {
            "pool_size": pool,
            "top_k": int(rng.integers(1, min(4, pool) + 1)),
            "group_start": int(rng.integers(2, 4)),
            "lr": float(np.exp(rng.uniform(np.log(0.002), np.log(0.2)))),
            "prompt_length": int(rng.choice([5, 10, 20])),
        }
        acc = 60 + 10 * np.tanh(pool / 20) - 2 * config["top_k"] + rng.normal(0, 1)
        status = "failed" if i in failed else ("early_stopped" if i in stopped else "completed")
        epochs = 4 if status == "completed" else 1
        result = {
            "epoch": epochs,
            "val_acc": acc,
            "val_many_acc": acc + 15,
            "val_medium_acc": acc,
            "val_few_acc": acc - 25 + pool / 4,
            "train_loss": 1.2,
            "mlflow_run_id": None,
            "node": "n0",
            "time_total_s": 20.0 + i,
        }
        if status == "failed":
            result = {
                "epoch": 1,
                "val_acc": math.nan,
                "error": "train_loss is nan in phase 2 epoch 0",
                "time_total_s": 3.0,
            }
        rows.append(trial_row(f"t{i:03d}", config, list(SPACE), result, 4))
    return rows


def fabricate_search(client, uri, root: Path, study: str, rows: list[TrialRow], objective: dict) -> tuple[str, Path]:
    """A finished search as the driver leaves it: parent and trial runs in MLflow, the folder."""
    exp = mt.experiment_id(client, study, uri)
    folder = root / f"{study}-smoke-20260101-000000"
    (folder / "prompts").mkdir(parents=True)
    parent = client.create_run(
        exp, run_name=folder.name, tags={names.ROLE: "study", "lpt.search": folder.name, "lpt.storage": str(folder)}
    ).info.run_id
    mt.log(
        client,
        parent,
        params={"study": study, "profile": "smoke", "objective": json.dumps(objective), "space": json.dumps(SPACE)},
    )
    for i, row in enumerate(rows):
        run = client.create_run(
            exp,
            run_name=f"trial-{row.trial_id}",
            start_time=1_000_000 + i,
            tags={names.ROLE: "trial", names.PARENT: parent, names.TRIAL_ID: row.trial_id},
        ).info.run_id
        row.mlflow_run_id = run
        curve = [Metric("val_acc", row.val_acc - 3 * (row.epochs - e), 0, e) for e in range(1, row.epochs + 1)]
        client.log_batch(run, metrics=curve, params=[Param(k, str(row.params[k])) for k in SPACE])
    write_table(rows, folder / "trials.parquet")
    done = [r for r in rows if r.status == "completed"]
    best = max(done, key=lambda r: r.val_acc)
    tensors = {
        "shared_prompts": torch.zeros(4, 4, 96),
        "group_prompts": torch.zeros(best.params["pool_size"], 2, 4, 96),
        "group_keys": torch.zeros(best.params["pool_size"], 96),
        "head_weight": torch.zeros(10, 96),
    }
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "prompts" / f"{best.trial_id}.safetensors"))
    client.set_tag(parent, "lpt.best_trial_id", best.trial_id)
    if "metrics" in objective:
        keys = objective["metrics"]
        front = [
            a.trial_id
            for a in done
            if not any(
                all(b.metric(k) >= a.metric(k) for k in keys) and any(b.metric(k) > a.metric(k) for k in keys)
                for b in done
            )
        ]
        client.set_tag(parent, "lpt.pareto_trials", ",".join(front))
    mt.log(
        client,
        parent,
        metrics={
            "search_wall_s": 321.0,
            "best_test_acc": 71.25,
            "best_test_many_acc": 88.5,
            "best_test_medium_acc": 70.0,
            "best_test_few_acc": 43.75,
        },
    )
    (folder / "search.json").write_text(
        json.dumps(
            {
                "name": folder.name,
                "study": study,
                "profile_name": "smoke",
                "profile": PROFILE,
                "study_config": {
                    "space": SPACE,
                    "objective": objective,
                    "early_stopping": {"enabled": "metrics" not in objective},  # as a study must say
                },
                "experiment_id": exp,
                "parent_run_id": parent,
            }
        )
    )
    client.set_terminated(parent, "FINISHED")
    return parent, folder


def test_build_study_rebuilds_states_params_and_curves():
    import optuna

    rows = fabricated_rows()
    histories = {r.trial_id: {1: 50.0, 2: 55.0} for r in rows}
    study = search_report.build_study(
        rows, SPECS, ["val_acc"], ["max"], histories, order=[r.trial_id for r in rows[::-1]]
    )
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 6 and states.count("PRUNED") == 2 and states.count("FAIL") == 1
    assert [t.user_attrs["trial_id"] for t in study.trials] == [r.trial_id for r in rows[::-1]]
    best = max((r for r in rows if r.status == "completed"), key=lambda r: r.val_acc)
    assert study.best_trial.user_attrs["trial_id"] == best.trial_id
    assert study.best_trial.params == {k: best.params[k] for k in SPACE}
    assert study.best_trial.intermediate_values == {1: 50.0, 2: 55.0}
    dists = study.best_trial.distributions
    assert dists["pool_size"] == optuna.distributions.IntDistribution(4, 40, step=2)
    assert dists["lr"].log and dists["prompt_length"].choices == (5, 10, 20)
    # the trainable narrows group_start to the backbone's depth: a value outside the study's range still fits
    odd = rows[0].model_copy(update={"trial_id": "zz", "params": {**rows[0].params, "group_start": 1}})
    assert search_report.build_study([odd], SPECS, ["val_acc"], ["max"]).trials[0].params["group_start"] == 1
    multi = search_report.build_study(rows, SPECS, ["val_acc", "val_few_acc"], ["max", "max"])
    assert len(multi.best_trials) >= 1 and all(len(t.values) == 2 for t in multi.best_trials)


def test_report_cli_rebuilds_a_search_from_mlflow_and_the_table(store, tmp_path, monkeypatch, capsys):
    folder_db, uri, client = store
    mt.experiment_id(client, "trial_report", uri)
    rows = fabricated_rows()
    rows[0].baseline = True  # the search's first trial: the profile's values
    parent, folder = fabricate_search(
        client, uri, tmp_path / "runs", "pool_study", rows, {"metric": "val_acc", "mode": "max"}
    )
    mt.log(
        client,
        parent,
        metrics={"gain_val_acc": 1.5, "gain_val_many_acc": 0.25, "gain_val_medium_acc": 2.0, "gain_val_few_acc": 3.75},
    )
    rows2 = fabricated_rows(n=3, seed=1, stopped=(1, 2), failed=())  # one completed trial, two objectives
    parent2, folder2 = fabricate_search(
        client,
        uri,
        tmp_path / "runs2",
        "pool_study",
        rows2,
        {"metrics": ["val_acc", "val_few_acc"], "modes": ["max", "max"]},
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    # the latest search of the study, written beside its table: several objectives (the Pareto front, no
    # learning curves), one completed trial (no importances, no parallel coordinates: the summary says why)
    assert report_cli.main(["--study", "studies/pool_study.yaml"]) == 0
    printed = capsys.readouterr().out
    assert str(folder2 / "report") in printed and "param_importances: not drawn, needs at least 2" in printed
    pngs2 = {p.name for p in (folder2 / "report").glob("*.png")}
    assert pngs2 == {"optimization_history.png", "slice.png", "pareto_front.png"}
    assert any(a.path == "report/pareto_front.png" for a in client.list_artifacts(parent2, "report"))
    page2 = (folder2 / "report" / "summary.html").read_text()
    front = client.get_run(parent2).data.tags["lpt.pareto_trials"]
    assert f"Pareto front on val_acc, val_few_acc: {front.replace(',', ', ')}" in page2
    assert "parallel coordinate: not drawn (needs at least 2 completed trials (1 completed))" in page2

    # a given run, elsewhere
    out = tmp_path / "again"
    assert report_cli.main(["--study", "pool_study", "--run-id", parent, "--out", str(out)]) == 0
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {
        "optimization_history.png",
        "intermediate_values.png",
        "param_importances.png",
        "parallel_coordinate.png",
        "slice.png",
    }
    for p in out.glob("*.png"):
        png_size(p)
    with open(out / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == pq.read_table(folder / "trials.parquet").num_rows
    assert {"trial_id", "status", "pool_size", "val_acc", "mlflow_run_id", "wall_s"} <= set(table[0])
    assert [r["status"] for r in table].count("failed") == 1
    page = (out / "summary.html").read_text()
    best = next(r for r in rows if r.trial_id == client.get_run(parent).data.tags["lpt.best_trial_id"])
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert f"Best trial {best.trial_id}" in page and "71.25" in page and "88.50" in page and "43.75" in page
    assert f"<td>{best.params['pool_size']}</td>" in page and "profile default" in page and "<td>8</td>" in page
    extra = 4 * 4 * 96 + best.params["pool_size"] * (2 * 4 * 96 + 96) + 10 * 96
    assert f"{extra:,}</b>" in page and "% of the" in page
    assert page.count("data:image/png;base64,") == 5
    baseline_row = (
        f"<tr><td>validation, baseline trial t000 (the profile's values)</td><td>{rows[0].val_acc:.2f}</td>"
        f"<td>{rows[0].val_many_acc:.2f}</td>"
    )
    assert baseline_row in page, page
    assert (
        "<tr><td>gain of the best over the baseline (points)</td><td>1.50</td><td>0.25</td><td>2.00</td>"
        "<td>3.75</td></tr>"
    ) in page
    arts = {a.path for a in client.list_artifacts(parent, "report")}
    assert arts == {f"report/{n}" for n in pngs | {"summary.html", "trials.csv"}}

    # --confirm's rows belong to the trial it retrained: after an extension found another best, they go
    confirm_row = "<tr><td>test, confirmation over 5 seeds (mean ± SE)</td><td>80.00 ± 1.50</td><td>80.00 ± 1.50</td>"
    mt.log(
        client,
        parent,
        metrics={
            f"confirm_test_{k}_{s}": v
            for k in ("acc", "many_acc", "medium_acc", "few_acc")
            for s, v in (("mean", 80.0), ("se", 1.5))
        }
        | {"confirm_seeds": 5, "confirm_gain_test_acc_mean": 0.5, "confirm_gain_test_acc_low": -0.25}
        | {"confirm_gain_test_acc_high": 1.25},
        tags={"lpt.confirmed_trial": best.trial_id, "lpt.confirmation": "not confirmed"},
    )
    assert report_cli.main(["--study", "pool_study", "--run-id", parent, "--out", str(out)]) == 0
    page = (out / "summary.html").read_text()
    assert confirm_row in page and "has not been confirmed" not in page
    # confirm metrics exist, the verdict is "not confirmed": the page says so (issue 29)
    assert "<p><b>Not confirmed.</b> On test, over fresh seeds," in page and "[-0.25, 1.25]" in page
    earlier = next(r.trial_id for r in rows if r.trial_id != best.trial_id)
    client.set_tag(parent, "lpt.confirmed_trial", earlier)
    assert report_cli.main(["--study", "pool_study", "--run-id", parent, "--out", str(out)]) == 0
    page = (out / "summary.html").read_text()
    assert confirm_row not in page
    assert (
        f"The confirmation seeds retrained trial {earlier}, the best before an extension; this best trial "
        "has not been confirmed."
    ) in page
    capsys.readouterr()

    # bad input: one line, exit 2
    trial_run = rows[0].mlflow_run_id
    (folder2 / "trials.parquet").unlink()
    for args, words in (
        (["--study", "nope"], "--study nope: no MLflow experiment"),
        (["--study", "pool_study", "--run-id", "0" * 32], "no such MLflow run"),
        (["--study", "pool_study", "--run-id", trial_run], "not a search's parent run"),
        (["--study", "trial_report", "--run-id", parent], "not in experiment 'trial_report'"),
        (["--study", "pool_study"], "trials.parquet: missing"),
        (
            ["--study", "pool_study", "--run-id", parent, "--storage", str(tmp_path / "nowhere")],
            "trials.parquet: missing",
        ),
    ):
        assert report_cli.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    (tmp_path / "absent").mkdir()
    assert report_cli.main(["--study", "pool_study"]) == 2
    assert "no MLflow store" in capsys.readouterr().err and not (tmp_path / "absent" / "mlflow.db").exists()


# ============================================================================ slow: a real search
@pytest.mark.slow
def test_report_of_a_finished_smoke_search(smoke_search, tmp_path):
    # the session's shared smoke search (conftest.py; SMOKE_TRIALS trials): read here, rebuilt on a copy below
    assert smoke_search.returncode == 0, smoke_search.stderr[-3000:]
    assert "report: " in smoke_search.stdout
    client = smoke_search.client()
    parents = runs_of(client, "study")
    assert len(parents) == 1
    parent = parents[0]
    folder = Path(parent.data.tags["lpt.storage"])
    assert folder == smoke_search.folder
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(rows) == SMOKE_TRIALS
    made = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/summary.html", "report/trials.csv", "report/optimization_history.png", "report/slice.png"} <= made
    assert "lpt.report_error" not in parent.data.tags

    # each trial that ran every epoch has its validation figures and the usage entropy
    trials = runs_of(client, "trial")
    completed = {r["mlflow_run_id"] for r in rows if r["status"] == "completed"}
    assert completed
    for run in trials:
        if run.info.run_id not in completed:
            continue
        assert "lpt.report_error" not in run.data.tags
        assert 0.0 <= run.data.metrics["prompt_usage_entropy"] <= 1.0
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
        assert {
            "report/per_class_accuracy.png",
            "report/shot_accuracy.png",
            "report/prompt_usage.png",
            "report/shot_confusion.png",
            "report/val_diagnostics.json",
        } <= arts
        diag = json.loads(
            Path(client.download_artifacts(run.info.run_id, "report/val_diagnostics.json", str(tmp_path))).read_text()
        )
        assert diag["phase1"] is not None and diag["acc"] == pytest.approx(run.data.metrics["val_acc"])

    # rebuild from MLflow and the table alone, after the first report is gone (on a copy: the search is shared)
    copy = smoke_search.copy_to(tmp_path / "search")
    copied = copy.client().get_run(parent.info.run_id)
    folder = Path(copied.data.tags["lpt.storage"])
    assert folder == copy.folder and folder.is_relative_to(tmp_path.resolve())
    shutil.rmtree(folder / "report")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tune" / "report.py"), "--study", "prompt_pool"],
        cwd=copy.cwd,
        env=search_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(folder / "report") in proc.stdout
    rebuilt = {p.name for p in (folder / "report").iterdir()}
    assert {f.removeprefix("report/") for f in made} == rebuilt
    with open(folder / "report" / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == SMOKE_TRIALS
    best = parent.data.tags["lpt.best_trial_id"]
    page = (folder / "report" / "summary.html").read_text()
    assert f"Best trial {best}" in page
    assert f"{parent.data.metrics['best_test_acc']:.2f}" in page
