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

import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient
from ray import tune

from tune import tracking as mt
from tune import tracking_guard
from tune.config.budget import hours_of
from tune.config.study import Resources
from tune.names import PROMPTS_DIR
from tune.storage import Location, location
from tune.trial import input_wait
from tune.trial.row import (  # noqa: F401 (re-exported: the table's rows and statuses)
    BUDGET_STOPPED,
    COMPLETED,
    COST_METRICS,
    EARLY_STOPPED,
    FAILED,
    FINAL_METRICS,
    INTERRUPTED,
    STATUSES,
    TrialRow,
)
from tune.trial.trial_runs import finish_trial_run


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
        kept = self.rows.get(trial.trial_id)
        if kept is not None and kept.status not in (FAILED, INTERRUPTED):
            # a search killed after a trial ended and before Ray's next snapshot: the restored run
            # runs the ended trial again (from a checkpoint Ray has since rotated away, so it fails);
            # the table's row stands, its run closes with it
            print(
                f"trial {trial.trial_id} had ended ({kept.status}) before the search stopped: its row stands",
                flush=True,
            )
            self.guard.attempt("close its run", finish_trial_run, self.client, kept, trial=trial.trial_id)
            return
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
