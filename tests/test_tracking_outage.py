"""MLflow out of reach: the client's retry settings and their window (``tune.tracking_retry``), and
the driver's guard (``tune.tracking_guard``) that records a tracking call that fails and goes on.

Fast: a tracking URI on a loopback port nothing listens on is a stopped MLflow server (connection
refused), so the retry window is measured for real. The search against a real ``mlflow server``
stopped mid-search is in tests/test_search_outage.py (slow).
"""

from __future__ import annotations

import json
import math
import socket
import time

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from ray.tune.experiment import Trial

from tune import tracking_guard
from tune.config.study import Resources
from tune.errors import ConfigError
from tune.tracking_retry import (
    BACKOFF_FACTOR,
    BACKOFF_JITTER,
    DEFAULTS,
    MAX_RETRIES,
    TIMEOUT,
    apply_retry_settings,
    describe,
    retry_settings,
    retry_window,
)
from tune.trial.table import TrialTable

MLFLOW_DEFAULTS = {MAX_RETRIES: 7, BACKOFF_FACTOR: 2, BACKOFF_JITTER: 1.0, TIMEOUT: 120}


def closed_port_uri() -> str:
    with socket.socket() as s:  # bound and closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_mlflows_own_defaults_retry_about_four_minutes_not_two():
    low, high, hung = retry_window(MLFLOW_DEFAULTS)
    assert (low, high) == (244, 249)  # 0 + 4 + 8 + 16 + 32 + 64 + min(120, 128) s, plus up to 1 s jitter each
    assert hung == 249 + 8 * 120


def test_the_projects_defaults_and_what_they_mean():
    assert retry_settings({}) == DEFAULTS
    low, high, hung = retry_window(DEFAULTS)
    assert 60 < low <= high < 300 and hung == high + (DEFAULTS[MAX_RETRIES] + 1) * DEFAULTS[TIMEOUT]
    assert "244-249 s against a stopped server" in describe(DEFAULTS)


def test_the_users_environment_wins_and_reaches_the_environment():
    env = {MAX_RETRIES: "2", BACKOFF_FACTOR: "1", BACKOFF_JITTER: "0"}
    applied = apply_retry_settings(env)
    assert applied == {MAX_RETRIES: "2", BACKOFF_FACTOR: "1", BACKOFF_JITTER: "0", TIMEOUT: str(DEFAULTS[TIMEOUT])}
    assert env == applied and retry_window(retry_settings(env))[:2] == (2, 2)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [(MAX_RETRIES, "11", "between 0 and 10"), (BACKOFF_FACTOR, "0.5", "not an integer"), (TIMEOUT, "0", "between 1")],
)
def test_a_value_mlflow_would_refuse_names_the_variable(name, value, says):
    with pytest.raises(ConfigError, match=f"^{name}={value}: .*{says}"):
        retry_settings({name: value})


def test_a_stopped_server_fails_a_call_after_the_computed_window(monkeypatch):
    for name, value in {MAX_RETRIES: "3", BACKOFF_FACTOR: "1", BACKOFF_JITTER: "0", TIMEOUT: "5"}.items():
        monkeypatch.setenv(name, value)
    low, high, _ = retry_window(retry_settings())
    assert low == high == 6  # sleeps of 0, 2 and 4 s between the 4 tries
    started = time.monotonic()
    with pytest.raises(Exception, match="Max retries exceeded"):
        MlflowClient(closed_port_uri()).get_run("0" * 32)
    took = time.monotonic() - started
    assert low <= took < high + 5, took


def ended_trial(trial_id: str, epochs: int, value: float) -> Trial:
    trial = Trial("stand_in", config={"pool_size": 8}, stub=True, trial_id=trial_id)
    trial.update_last_result(
        {"epoch": epochs, "val_acc": value, "mlflow_run_id": f"run-{trial_id}", "time_total_s": 2.0}
    )
    return trial


def test_the_table_callback_records_a_tracking_failure_and_goes_on(tmp_path, monkeypatch, capsys):
    """MLflow stopped past the retry window: every row is in the table, the trials' runs are named
    as lost, the callback raises nothing, and the second trial does not wait a window again."""
    monkeypatch.setenv(MAX_RETRIES, "2")
    monkeypatch.setenv(BACKOFF_FACTOR, "1")
    monkeypatch.setenv(BACKOFF_JITTER, "0")
    uri = closed_port_uri()
    folder = tmp_path / "search"
    folder.mkdir()
    table = TrialTable(
        folder / "trials.parquet", ["pool_size"], 2, MlflowClient(uri), 2, "val_acc", resources=Resources(cpu=1, gpu=0)
    )
    first, second = ended_trial("t_00001", 2, 61.0), ended_trial("t_00002", 1, 40.0)
    started = time.monotonic()
    table.on_trial_complete(0, [first, second], first)
    assert time.monotonic() - started >= 2  # MLflow's client retried for its window first
    started = time.monotonic()
    table.on_trial_complete(0, [first, second], second)
    assert time.monotonic() - started < 10  # the server's /health did not answer: skipped at once

    rows = {r["trial_id"]: r for r in pq.read_table(folder / "trials.parquet").to_pylist()}
    assert {t: r["status"] for t, r in rows.items()} == {"t_00001": "completed", "t_00002": "early_stopped"}
    assert rows["t_00001"]["mlflow_run_id"] == "run-t_00001" and math.isclose(rows["t_00001"]["val_acc"], 61.0)

    guard = tracking_guard.for_search(folder, uri)
    assert [(f.trial, f.call) for f in guard.failures] == [
        ("t_00001", "close its run"),
        ("t_00002", "close its run"),
    ]
    assert "Max retries exceeded" in guard.failures[0].error or "Connection refused" in guard.failures[0].error
    lines = guard.summary_lines()
    assert lines[0] == "tracking: 2 MLflow calls failed; lost their tracking: trial t_00001, trial t_00002"
    assert json.loads(guard.tag_value()) == [
        {"trial": f.trial, "call": f.call, "error": f.error} for f in guard.failures
    ]
    out = capsys.readouterr().out
    assert "warning: MLflow: close its run of trial t_00001 failed" in out
    assert "close its run of trial t_00002 skipped, the server is still down" in out


def test_a_guard_lets_other_errors_through(tmp_path):
    guard = tracking_guard.TrackingGuard("sqlite:///" + str(tmp_path / "mlflow.db"))
    with pytest.raises(ZeroDivisionError):  # a bug is not a tracking outage
        guard.attempt("divide", lambda: 1 / 0)
    assert guard.attempt("add", lambda a, b: a + b, 1, 2) == 3 and guard.failures == []
