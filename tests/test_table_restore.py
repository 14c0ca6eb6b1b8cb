"""The trial table across ``--resume``: a restored Tune run that ends a trial the table already holds
as ended keeps the table's row and closes its MLflow run with it; the wrap-up closes the runs of
ended trials that an earlier driver left open.

A search killed after a trial's end reached the table and before Ray's next experiment snapshot
(Ray rotates the trial's checkpoints first) is restored with that trial still RUNNING; Ray then
fails to restore it from the checkpoint it has deleted. Seen in the SIGKILL-and-resume test
(tests/test_search_e2e.py), where it replaced a completed baseline row by a failed one. Fast: a
real SQLite MLflow store, the callback pickled and unpickled as ``Tuner.restore`` does.
"""

from __future__ import annotations

import math
import pickle

from mlflow import MlflowClient
from ray.tune.experiment import Trial

from tune import tracking as mt
from tune import tracking_guard
from tune.config.study import Resources
from tune.trial.table import TrialRow, TrialTable, read_rows
from tune.trial.trial_runs import close_lost_runs


def ended_trial(trial_id: str, run_id: str, value: float, epochs: int = 2) -> Trial:
    trial = Trial("stand_in", config={"pool_size": 8}, stub=True, trial_id=trial_id)
    trial.update_last_result({"epoch": epochs, "val_acc": value, "mlflow_run_id": run_id, "time_total_s": 2.0})
    return trial


def test_a_restored_run_that_fails_an_ended_trial_keeps_its_row_and_closes_its_run(tmp_path, capsys):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("restore")
    ended, errored = (client.create_run(exp).info.run_id for _ in range(2))
    folder = tmp_path / "search"
    folder.mkdir()
    table = TrialTable(
        folder / "trials.parquet", ["pool_size"], 2, client, 3, "val_acc", resources=Resources(cpu=1, gpu=0)
    )
    pickled = pickle.dumps(table)  # Tune pickles its callbacks as the search starts
    table.on_trial_complete(0, [], ended_trial("t_1", ended, 61.0))
    table.on_trial_error(0, [], ended_trial("t_2", errored, 40.0, epochs=1))
    client.set_terminated(ended, "RUNNING")  # killed before the run's closing reached MLflow

    restored = pickle.loads(pickled)  # --resume: the rows come from the table
    restored.on_trial_error(0, [], ended_trial("t_1", ended, math.nan, epochs=1))  # the checkpoint is gone
    restored.on_trial_complete(0, [], ended_trial("t_2", errored, 70.0))  # resume_errored retried it

    rows = read_rows(folder / "trials.parquet")
    assert (rows["t_1"].status, rows["t_1"].val_acc, rows["t_1"].epochs) == ("completed", 61.0, 2)
    assert (rows["t_2"].status, rows["t_2"].val_acc) == ("completed", 70.0)  # a failed row is re-decided
    assert client.get_run(ended).info.status == "FINISHED"
    assert client.get_run(ended).data.tags["lpt.status"] == "completed"
    assert "trial t_1 had ended (completed) before the search stopped: its row stands" in capsys.readouterr().out


def test_the_wrap_up_closes_the_runs_an_earlier_driver_left_open(tmp_path):
    """A driver killed between a trial's row and its run's closing: the resumed driver's wrap-up
    finds the search's trial runs still RUNNING and closes those whose rows have ended (an
    interrupted trial's run stays open for the trial that continues it)."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("wrap-up")
    parent = client.create_run(exp).info.run_id
    runs = {t: mt.trial_run(client, exp, parent, t, t, {}, {}) for t in ("t_done", "t_closed", "t_on")}
    client.set_terminated(runs["t_closed"], "FINISHED")
    rows = [
        TrialRow(trial_id="t_done", status="completed", epochs=2, val_acc=61.0, wall_s=7.0, cpu_hours=0.002),
        TrialRow(trial_id="t_closed", status="completed", epochs=2, mlflow_run_id=runs["t_closed"]),
        TrialRow(trial_id="t_on", status="interrupted", epochs=1),
    ]
    guard = tracking_guard.TrackingGuard(client.tracking_uri)
    assert close_lost_runs(client, rows, guard, (exp, parent)) == ["t_done"]
    done = client.get_run(runs["t_done"])
    assert (done.info.status, done.data.tags["lpt.status"], done.data.metrics["cpu_hours"]) == (
        "FINISHED",
        "completed",
        0.002,
    )
    assert rows[0].mlflow_run_id == runs["t_done"] and client.get_run(runs["t_on"]).info.status == "RUNNING"
    assert guard.summary_lines(["t_done"]) == [
        "tracking: closed at the wrap-up the runs an earlier driver left open: trial t_done"
    ]
