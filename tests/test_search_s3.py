"""A whole smoke search with its storage on an S3-compatible server on loopback (slow): every file a
search keeps lands in the bucket, the report and the registered model are rebuilt and used from the
parent run's ``lpt.storage`` URI, ``--resume --trials`` extends it from a machine with no working
copy of its own, and the store's secret key is nowhere in the bucket or in MLflow."""

from __future__ import annotations

import subprocess
import sys

import pytest
from s3_server import start_s3
from smoke_search import ROOT, runs_of, search_argv, search_env

from tune.storage import Location

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = start_s3(tmp_path_factory.mktemp("s3"))
    server.make_bucket("lpt")
    yield server
    server.stop()


def run(cwd, s3, *argv: str, script: str = "search", **env) -> subprocess.CompletedProcess:
    command = search_argv(*argv) if script == "search" else [sys.executable, str(ROOT / "tune" / script), *argv]
    return subprocess.run(
        command, cwd=cwd, env=search_env(**s3.env(), **env), capture_output=True, text=True, timeout=900
    )


def test_a_search_on_object_storage(s3, tmp_path, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    uri = s3.uri("lpt", "runs")
    first = run(
        tmp_path, s3, "--study", "prompt_pool", "--trials", "3", "--register", "--storage", uri,
        LPT_WORK_DIR=str(tmp_path / "driver-1"),
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = runs_of(client, "study")
    folder = Location(parent.data.tags["lpt.storage"])
    assert str(folder).startswith("s3://lpt/runs/prompt_pool-smoke-") and folder.name == parent.data.tags["lpt.search"]
    stored = {f.path[len(folder.path) + 1 :] for f in folder.files()}
    trial_rows = {r.data.tags["lpt.trial_id"] for r in runs_of(client, "trial")}
    assert {"search.json", "trials.parquet", "profile.yaml", "optuna.db", "tuner.pkl"} <= stored
    assert {"report/summary.html", "report/trials.csv"} <= stored
    prompts = {p for p in stored if p.startswith("prompts/")}
    assert prompts and prompts <= {f"prompts/{t}.safetensors" for t in trial_rows}
    assert any(p.endswith("/state.safetensors") and "/checkpoint_" in p for p in stored)  # Tune's checkpoints
    cache = {f.path.rsplit("/", 2)[-1] for f in (Location(uri) / "phase1-cache").files()}
    assert cache == {"prompts.safetensors", "info.json", "state.safetensors"}
    assert not (tmp_path / "runs").exists()  # nothing in a local folder

    # the report, rebuilt from the URI in the parent run's tag; the registered model predicts
    (folder / "report" / "summary.html").delete()
    report = run(tmp_path, s3, "--study", "prompt_pool", script="report.py")
    assert report.returncode == 0, report.stderr[-3000:]
    assert (folder / "report" / "summary.html").is_file()
    model_uri = client.get_run(parent.info.run_id).data.tags["lpt.model_uri"]
    predict = run(
        tmp_path, s3, "--model", model_uri, "--split", "test", "--out", str(tmp_path / "p.csv"), script="predict.py"
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert "200 images classified by models:/" in predict.stdout and "recorded by the search" in predict.stdout

    # extended by a driver on another machine: no working copy of the Optuna study there
    extend = run(
        tmp_path, s3, "--study", "prompt_pool", "--resume", "--trials", "4", "--storage", uri,
        LPT_WORK_DIR=str(tmp_path / "driver-2"),
    )  # fmt: skip
    assert extend.returncode == 0, extend.stderr[-3000:]
    assert "extending" in extend.stdout and (tmp_path / "driver-2" / folder.name / "optuna.db").is_file()
    import optuna

    study = optuna.load_study(
        study_name=folder.name, storage=f"sqlite:///{tmp_path / 'driver-2' / folder.name / 'optuna.db'}"
    )
    assert len(study.trials) == 4
    published = tmp_path / "published.db"
    (folder / "optuna.db").download(published)
    assert len(optuna.load_study(study_name=folder.name, storage=f"sqlite:///{published}").trials) == 4

    # the secret is in no object and no MLflow param or tag
    secret = s3.secret.encode()
    assert not [f.path for f in Location(uri).files() if secret in f.read_bytes()]
    for r in client.search_runs([parent.info.experiment_id], max_results=500):
        assert s3.secret not in str(r.data.params) + str(r.data.tags)
