"""A search whose MLflow server is stopped mid-search for longer than the client's retry window
(configured short here: 2 s), then started again: the search ends 0, every trial is in
trials.parquet and in the Optuna study with the same outcome, and the summary and the parent run's
``lpt.tracking_failures`` name what lost its tracking.

Slow (a minute or two): a real ``mlflow server`` (SQLite backend, artifacts served) on loopback
and the driver's own local Ray, as ``tune/search.py`` runs from a shell.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import yaml
from cluster_fixtures import LOOPBACK, ROOT, VENV_BIN, Proc, free_port, wait_http
from mlflow import MlflowClient
from smoke_search import search_argv, search_env
from test_search_e2e import kill_session

from tune.engine.optuna_storage import open_storage
from tune.names import OPTUNA_TRIAL_ID, TRACKING_FAILURES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SHORT_WINDOW = {  # 2 s of retries against a stopped server (tune.tracking_retry.retry_window)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
DOWN_AT_LEAST_S = 5  # past the window; and until the driver has recorded a failed call
# the 2 trials running when MLflow stops fail, and perhaps the 2 that start next; the last 2 start
# when it is back
TRIALS = 6


def start_mlflow(workdir: Path, port: int) -> Proc:
    argv = [
        str(VENV_BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        str(workdir / "mlartifacts"),
        "--serve-artifacts",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = search_env()
    proc = Proc("mlflow server", argv, env, workdir / f"mlflow-{time.time():.0f}.log", cwd=workdir)
    wait_http(f"http://{LOOPBACK}:{port}/health", 240, proc)
    return proc


def a_trial_has_logged_an_epoch(client: MlflowClient) -> bool:
    exp = client.get_experiment_by_name("outage")
    if exp is None:
        return False
    runs = client.search_runs([exp.experiment_id], "tags.`lpt.role` = 'trial'")
    return any("val_acc" in r.data.metrics for r in runs)


def test_mlflow_down_past_the_retry_window_loses_tracking_not_the_search(tmp_path):
    if not (VENV_BIN / "mlflow").exists():
        pytest.skip("`mlflow` is not installed next to the interpreter")
    study = yaml.safe_load((ROOT / "studies" / "prompt_pool.yaml").read_text())
    study["budget"].update(trials=TRIALS, concurrency=2, max_failures=0)
    study["early_stopping"]["enabled"] = False
    (tmp_path / "outage.yaml").write_text(yaml.safe_dump(study))
    port = free_port()
    uri = f"http://{LOOPBACK}:{port}"
    server = start_mlflow(tmp_path, port)
    argv = search_argv("--study", str(tmp_path / "outage.yaml"), "--set", "phase2.epochs=2")
    driver = Proc(
        "search", argv, search_env(MLFLOW_TRACKING_URI=uri, **SHORT_WINDOW), tmp_path / "driver.log", tmp_path
    )
    try:
        client = MlflowClient(uri)
        deadline = time.time() + 400
        while not a_trial_has_logged_an_epoch(client):
            assert driver.alive() and time.time() < deadline, f"no trial logged an epoch:\n{driver.tail()}"
            time.sleep(1)
        server.stop()
        stopped = time.time()
        while time.time() - stopped < DOWN_AT_LEAST_S or "warning: MLflow:" not in driver.tail(10**6):
            assert driver.alive() and time.time() - stopped < 300, f"the driver recorded no failure:\n{driver.tail()}"
            time.sleep(1)
        print(f"MLflow was down {time.time() - stopped:.0f} s")
        server = start_mlflow(tmp_path, port)
        try:
            driver.popen.wait(timeout=480)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the search did not end:\n{driver.tail()}")
        out = driver.tail(10**6)
        assert driver.popen.returncode == 0, out[-6000:]

        folder = next((tmp_path / "runs").glob("outage-smoke-*"))
        rows = {r["trial_id"]: r for r in pq.read_table(folder / "trials.parquet").to_pylist()}
        assert len(rows) == TRIALS, rows
        failed = {t for t, r in rows.items() if r["status"] == "failed"}
        assert failed and len(failed) < TRIALS, rows  # the trials that met the outage failed cleanly; the others ran
        assert all("API request to" in rows[t]["error"] for t in failed), [rows[t]["error"] for t in failed]

        record = json.loads((folder / "search.json").read_text())
        study = optuna.load_study(study_name=record["optuna_study"], storage=open_storage(record["optuna_storage"]))
        states = {t.user_attrs[OPTUNA_TRIAL_ID]: t.state for t in study.trials}
        assert set(states) == set(rows)
        assert {t for t, s in states.items() if s == optuna.trial.TrialState.FAIL} == failed

        summary = next(line for line in out.splitlines() if line.startswith("tracking: "))
        print(summary, {t: r["status"] for t, r in rows.items()})
        assert all(f"trial {t}" in summary for t in failed), summary
        assert "  closed at the wrap-up, MLflow back: the runs of trial " in out
        client = MlflowClient(uri)
        for t, row in rows.items():  # every run the trials made is closed with the table's status
            if row["mlflow_run_id"] is None:
                assert t in failed  # it failed before it could make its run
                continue
            run = client.get_run(row["mlflow_run_id"])
            assert (run.info.status, run.data.tags["lpt.status"]) == (
                "FAILED" if t in failed else "FINISHED",
                row["status"],
            ), t
        parent = client.get_run(record["parent_run_id"])
        assert parent.info.status == "FINISHED"
        lost = json.loads(parent.data.tags[TRACKING_FAILURES])
        assert failed <= {f["trial"] for f in lost} and all(f["call"] and f["error"] for f in lost), lost
    finally:
        driver.stop()
        kill_session(driver.popen.pid)  # its local Ray's processes
        server.stop()
