"""A trial's MLflow run closed with its row's status: at the trial's end (the table callback), for a
trial a resumed search restores after it had ended (its row in the table, its run maybe still
open), and at the wrap-up for every ended trial whose run is still open (MLflow was away, or an
earlier driver was killed before it closed the run)."""

from __future__ import annotations

import math
import time

from mlflow import MlflowClient

from tune import tracking as mt
from tune import tracking_guard
from tune.names import STATUS
from tune.trial.row import COST_METRICS, FAILED, INTERRUPTED, TrialRow


def close_trial_run(client: MlflowClient, row: TrialRow) -> None:
    """End an ended trial's MLflow run with the table's status (a trial that ASHA stops is ended
    by Ray before its own code can close the run)."""
    if row.mlflow_run_id:
        client.set_tag(row.mlflow_run_id, STATUS, row.status)
        client.set_terminated(
            row.mlflow_run_id, "FAILED" if row.status == FAILED else "FINISHED", end_time=int(time.time() * 1000)
        )


def finish_trial_run(client: MlflowClient, row: TrialRow) -> bool:
    """Log an ended trial's cost on its run and close it (``close_trial_run``); True when done."""
    cost = {m: getattr(row, m) for m in COST_METRICS if math.isfinite(getattr(row, m))}
    if row.mlflow_run_id and cost:
        mt.log(client, row.mlflow_run_id, metrics=cost)
    close_trial_run(client, row)
    return True


def find_trial_run(client: MlflowClient, row: TrialRow, search_run: tuple[str, str]) -> str | None:
    """The row's MLflow run id; a trial that ended before its first epoch has reported none: its
    run found by its tags (``search_run``: the experiment and parent run ids), None when it made none."""
    row.mlflow_run_id = row.mlflow_run_id or mt.trial_run_id(client, *search_run, row.trial_id)
    return row.mlflow_run_id


def close_lost_runs(
    client: MlflowClient, rows: list[TrialRow], guard: tracking_guard.TrackingGuard, search_run: tuple[str, str]
) -> list[str]:
    """At the wrap-up: the runs of ended trials still open in MLflow, found by one query and closed
    now: those whose closing failed while MLflow was away (``guard`` names them in the summary)
    and those an earlier driver left open (it was killed between a trial's row and its run's
    closing). Returns the ids of the trials whose runs are closed."""
    still_open = guard.attempt("find the open trial runs", mt.open_trial_runs, client, *search_run) or {}
    closed = []
    for row in (r for r in rows if r.trial_id in still_open and r.status != INTERRUPTED):
        row.mlflow_run_id = row.mlflow_run_id or still_open[row.trial_id]
        if guard.attempt("close its run at the wrap-up", finish_trial_run, client, row, trial=row.trial_id):
            closed.append(row.trial_id)
    return closed
