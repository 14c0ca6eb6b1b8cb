"""A row of ``trials.parquet``: ``TrialRow``, the statuses a trial ends with and the metrics a row
keeps; ``tune.trial.table`` writes and reads the table and re-exports these names."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel

from tune.config.budget import MEASURES
from tune.config.study import OBJECTIVE_METRICS
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
