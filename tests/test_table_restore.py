"""The trial table across ``--resume``: a restored Tune run that ends a trial the table already holds
as ended keeps the table's row and closes its MLflow run with it.

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

from tune.config.study import Resources
from tune.trial.table import TrialTable, read_rows


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
