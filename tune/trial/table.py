"""``trials.parquet``: one row per trial, rewritten as trials end, so a crash leaves what finished.
A row is a ``TrialRow``; ``write_table`` and ``read_rows`` convert it to and from the Parquet
columns in one place (``TrialRow.columns``, ``TrialRow.from_columns``).

The same Tune callback closes each trial's MLflow run with its final status (a trial that ASHA
stops is ended by Ray before its own code can do that) and logs what the trial cost
(``gpu_hours``, ``cpu_hours``: its wall time x its resources), through the search's
``tune.tracking_guard``: MLflow out of reach past its retry window loses that run's closing (the
summary names it), never the row or the search. The helpers below read the rows
(best trial, counts by status) for the driver's wrap-up and the search report.
"""

from __future__ import annotations

import io
import math
import os
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient
from pydantic import BaseModel
from ray import tune

from tune import tracking as mt
from tune import tracking_guard
from tune.config.budget import MEASURES, hours_of
from tune.config.study import OBJECTIVE_METRICS, Resources
from tune.names import PROMPTS_DIR, STATUS
from tune.storage import Location, location
from tune.trial import input_wait

FINAL_METRICS = (*OBJECTIVE_METRICS, "train_loss", input_wait.METRIC)
COMPLETED, EARLY_STOPPED, FAILED, INTERRUPTED = "completed", "early_stopped", "failed", "interrupted"
BUDGET_STOPPED = "budget_stopped"  # budget.on_exhausted: stop ended it before its last epoch
STATUSES = (COMPLETED, EARLY_STOPPED, FAILED, INTERRUPTED, BUDGET_STOPPED)
COST_METRICS = tuple(MEASURES)  # gpu_hours, cpu_hours: a trial's wall time x its resources, in hours


class TrialRow(BaseModel):
    """One trial: status, epochs run, baseline or not, sampled ``params``, last-epoch metrics
    (``FINAL_METRICS``; NaN when none), MLflow run, node, wall time, cost, the error it raised."""

    trial_id: str
    status: str
    epochs: int = 0
    baseline: bool = False
    params: dict[str, Any] = {}
    val_acc: float = math.nan  # FINAL_METRICS, in their order
    val_many_acc: float = math.nan
    val_medium_acc: float = math.nan
    val_few_acc: float = math.nan
    train_loss: float = math.nan
    input_wait_fraction: float = math.nan
    mlflow_run_id: str | None = None
    node: str | None = None
    wall_s: float = math.nan
    gpu_hours: float = math.nan  # COST_METRICS
    cpu_hours: float = math.nan
    error: str | None = None

    def metric(self, name: str) -> float:  # a final metric by its name (the objective's)
        return getattr(self, name) if name in FINAL_METRICS else math.nan

    def metrics(self) -> dict[str, float]:  # for the summary lines, which take metric dicts
        return {m: getattr(self, m) for m in FINAL_METRICS}

    def columns(self) -> dict[str, Any]:
        """The Parquet row: the fixed columns, the parameters after ``baseline``."""
        out = self.model_dump(exclude={"params"})
        head = {k: out.pop(k) for k in ("trial_id", "status", "epochs", "baseline")}
        return {**head, **self.params, **out}

    @classmethod
    def from_columns(cls, columns: dict[str, Any]) -> TrialRow:
        """A row of the Parquet table (a column an older table lacks at its default)."""
        fixed = {k: v for k, v in columns.items() if k in cls.model_fields and v is not None}
        return cls(**fixed, params={k: v for k, v in columns.items() if k not in cls.model_fields})

    def value(self, column: str) -> Any:  # a column by its name: a parameter's or a fixed one's
        return self.params[column] if column in self.params else getattr(self, column, None)


def prompt_path(folder: str | os.PathLike | Location, trial_id: str) -> Location:
    """Where a trial that ran every epoch saves its prompts, in the search folder."""
    return location(folder) / PROMPTS_DIR / f"{trial_id}.safetensors"


def last_line(error) -> str:
    """A trial's error (Ray's traceback text) as its last line, which names the exception."""
    lines = str(error).strip().splitlines()
    return lines[-1][:500] if lines else type(error).__name__


def trial_error(trial) -> str:
    """The message of the exception a trial raised, from Ray's stored error (``get_error``)."""
    try:
        error = trial.get_error()
        if error is None and trial.error_file and os.path.isfile(trial.error_file):
            # Ray writes the error beside the driver first and syncs it to the storage later,
            # after the callbacks (get_error reads the storage's copy)
            with open(trial.error_file, encoding="utf-8", errors="replace") as f:
                error = f.read()
    except Exception as exc:  # the error file itself cannot be read
        return f"trial raised; its error could not be read ({type(exc).__name__}: {exc})"[:500]
    return last_line(error) if error else "trial raised (no error recorded by Ray)"


def trial_row(
    trial_id: str,
    config: dict,
    params: list[str],
    result: dict | None,
    epochs: int,
    error: str | None = None,
    interrupted: bool = False,
    resources: Resources | None = None,
    budget_stopped: bool = False,
) -> TrialRow:
    """A table row; ``interrupted``: the search stopped (Ctrl+C, SIGTERM) before this trial ended;
    ``budget_stopped``: the budget stopped it; ``resources``: a trial's, for its cost columns."""
    result = result or {}
    reason = error or result.get("error")
    done = int(result.get("epoch", 0) or 0)
    status = (
        FAILED
        if reason
        else COMPLETED
        if done >= epochs
        else INTERRUPTED
        if interrupted
        else BUDGET_STOPPED
        if budget_stopped
        else EARLY_STOPPED
    )
    finals = {m: result.get(m) for m in FINAL_METRICS}  # Tune's result dict: the trial's edge
    wall = float(result.get("time_total_s", math.nan))
    return TrialRow(
        trial_id=trial_id,
        status=status,
        epochs=done,
        baseline=bool(config.get("baseline", False)),
        params={p: config.get(p) for p in params},
        **{m: float(v) if isinstance(v, (int, float)) else math.nan for m, v in finals.items()},
        mlflow_run_id=result.get("mlflow_run_id"),
        node=result.get("node"),
        wall_s=wall,
        **(hours_of(wall, resources) if resources else dict.fromkeys(COST_METRICS, math.nan)),
        error=reason,
    )


def write_table(rows: list[TrialRow], path: str | os.PathLike | Location, metadata: dict[str, str] | None = None):
    """Publish the table whole (``tune.storage``); ``metadata``: its key-value metadata (the
    wrap-up's ``lpt.budget``)."""
    table = pa.Table.from_pylist([r.columns() for r in sorted(rows, key=lambda r: r.trial_id)])
    buffer = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **(metadata or {})}), buffer)
    location(path).write_bytes(buffer.getvalue())


def read_table(path: str | os.PathLike | Location) -> pa.Table | None:
    """The table with its metadata, or None when there is none yet."""
    path = location(path)
    return pq.read_table(io.BytesIO(path.read_bytes())) if path.is_file() else None


def read_rows(path: str | os.PathLike | Location) -> dict[str, TrialRow]:
    table = read_table(path)
    rows = [TrialRow.from_columns(r) for r in table.to_pylist()] if table is not None else []
    return {r.trial_id: r for r in rows}


def status_counts(rows: list[TrialRow]) -> dict[str, int]:
    return {s: sum(r.status == s for r in rows) for s in STATUSES}


def best_row(rows: list[TrialRow], metric: str, mode: str) -> TrialRow | None:
    """The completed trial with the best finite ``metric``; None if no trial completed."""
    done = [r for r in rows if r.status == COMPLETED and math.isfinite(r.metric(metric))]
    if not done:
        return None
    sign = 1 if mode == "max" else -1
    return max(done, key=lambda r: sign * r.metric(metric))


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
    """At the wrap-up: the runs whose closing failed while MLflow was away (``guard``'s failures)
    found and closed now; the ids of the trials whose runs are closed."""
    lost = {f.trial for f in guard.failures if f.call in ("find its run", "close its run")}
    closed = []
    for row in (r for r in rows if r.trial_id in lost):

        def close(row: TrialRow = row) -> bool:
            return bool(find_trial_run(client, row, search_run)) and finish_trial_run(client, row)

        if guard.attempt("close its run at the wrap-up", close, trial=row.trial_id):
            closed.append(row.trial_id)
    return closed


class TrialTable(tune.Callback):
    def __init__(
        self,
        path: str | os.PathLike | Location,
        params: list[str],
        epochs: int,
        client: MlflowClient,
        budget: int,
        metric: str,
        prior: list[TrialRow] | tuple[()] = (),
        search_run: tuple[str, str] | None = None,
        resources: Resources | None = None,
        budget_stopper=None,
    ):
        """``search_run``: (experiment id, parent run id), to find the run of a trial that ended
        before it reported one (it raised, or was stopped, before its first epoch);
        ``budget_stopper``: the run's ``budget.BudgetStopper`` (its ``stopped`` trials)."""
        self.path, self.params, self.epochs, self.client = location(path), params, epochs, client
        self.budget, self.metric, self.search_run = budget, metric, search_run
        self.resources, self.budget_stopper = resources, budget_stopper
        # a new search starts empty; an extension with the rows of the runs before it
        self.rows: dict[str, TrialRow] = {r.trial_id: r for r in prior}

    def __setstate__(self, state: dict) -> None:
        # Tuner.restore (--resume) unpickles this callback as it was when the search began: the rows
        # that ended since are in the table; a search started before the budget has no resources or
        # stopper, one started before the profile was a model has its resources as a dict
        self.__dict__.update({"resources": None, "budget_stopper": None, **state}, rows=read_rows(state["path"]))
        self.resources = Resources.model_validate(self.resources) if self.resources is not None else None

    @property
    def guard(self) -> tracking_guard.TrackingGuard:
        """The search's tracking guard: an MLflow call that fails is recorded, the search goes on."""
        return tracking_guard.for_search(self.path.parent, self.client.tracking_uri)

    def _end(self, trial, error: str | None) -> None:
        stopped = self.budget_stopper is not None and trial.trial_id in self.budget_stopper.stopped
        row = trial_row(
            trial.trial_id,
            trial.config,
            self.params,
            trial.last_result,
            self.epochs,
            error,
            resources=self.resources,
            budget_stopped=stopped,
        )
        if not row.mlflow_run_id and self.search_run:
            row.mlflow_run_id = self.guard.attempt(
                "find its run", mt.trial_run_id, self.client, *self.search_run, trial.trial_id, trial=trial.trial_id
            )
        self.rows[trial.trial_id] = row
        write_table(list(self.rows.values()), self.path)
        shown = ", ".join(f"{p}={row.params[p]}" for p in self.params)
        print(
            f"trial {len(self.rows)}/{self.budget} {trial.trial_id} {row.status} after {row.epochs} "
            f"epochs: {self.metric} {row.metric(self.metric):.2f} ({shown})"
            + input_wait.trial_note(row.input_wait_fraction)
            + (f" - {row.error}" if row.error else ""),
            flush=True,
        )
        # the row is in the table first: MLflow being away loses no trial
        self.guard.attempt("close its run", finish_trial_run, self.client, row, trial=trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, trial_error(trial))
