"""A search's cost in GPU-hours (or CPU-core-hours) and the budget that caps it.

Spent = the wall time of each trial x its ``resources.gpu`` (``resources.cpu`` for CPU-core-hours),
plus each phase-1 training up front and each ``--confirm`` seed x the same resources
(``SearchRecord.phase1_task_s``, ``confirm_task_s``). A study's
``budget.gpu_hours`` or ``budget.cpu_hours`` caps it (``--gpu-hours`` / ``--cpu-hours``, or
``--set budget.gpu_hours=...``): a trial starts only while the hours spent, the hours the running
trials will still take to their last epoch (at the pace each has measured), and the hours of one
more trial (the mean of the trials ended so far; before any ended, a running one's pace or the
profile's ``images_per_s``) fit in the budget. Once they no longer fit, no new trial starts; the
running ones finish (``on_exhausted: finish``) or stop at their next epoch when the hours are
spent (``stop``). A trial the budget kept from starting is no trial at all: no row, no failure.

The budget is one story in three modules: this one plans it (the limit, the measures, the dry run's
estimates, what ``--resume`` may change); ``tune.engine.budget_ledger.SpendLedger`` is the one
place that says what a search has spent (from ``search.json``, ``trials.parquet`` and the results
Tune reports; ``--confirm`` seeds included); ``tune.engine.budget_gate`` holds the Ray Tune pieces
that ask the ledger whether a trial may start or must stop. The dry
run's lines (``plan_lines``) use ASHA's rungs (``early_stopping.asha_rungs``) for the count ASHA's
early stops let it pay for.
This module imports no Ray: a dry run checks and describes a budget without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tune.config.early_stopping import asha_rungs, grace_epochs
from tune.errors import ConfigError

if TYPE_CHECKING:
    from tune.config.study import Budget, ProfileConfig, Resources, StudyConfig

# measure: (the resources key it multiplies the wall time by, its name in words)
MEASURES = {"gpu_hours": ("gpu", "GPU-hours"), "cpu_hours": ("cpu", "CPU-core-hours")}
PHASE1_TASK_S = "phase1_task_s"  # search.json: seconds of the phase-1 tasks trained up front, summed
TRIAL_ESTIMATE_S = "trial_estimate_s"  # search.json: a whole trial's seconds at images_per_s (or null)
BUDGET_KEYS = ("gpu_hours", "cpu_hours", "on_exhausted")  # may change on --resume


def fmt(hours: float) -> str:
    """``3.2``, ``10``, ``0.00421``, ``125``."""
    return f"{hours:.0f}" if abs(hours) >= 100 else f"{hours:.3g}"


def hours_of(seconds: float, resources: Resources) -> dict[str, float]:
    """``{"gpu_hours": ..., "cpu_hours": ...}`` of ``seconds`` of wall time on ``resources``."""
    return {measure: seconds * getattr(resources, key) / 3600 for measure, (key, _) in MEASURES.items()}


# ----------------------------------------------------------------------------- the limit
@dataclass(frozen=True)
class BudgetLimit:
    measure: str  # gpu_hours | cpu_hours
    hours: float
    on_exhausted: str  # finish | stop

    @classmethod
    def of(cls, budget: Budget) -> BudgetLimit | None:
        """The limit of a study's ``budget`` section; None without one."""
        for measure in MEASURES:
            hours = getattr(budget, measure)
            if hours is not None:
                return cls(measure, float(hours), budget.on_exhausted)
        return None

    @property
    def label(self) -> str:
        return MEASURES[self.measure][1]

    def describe(self) -> str:
        then = "running trials finish" if self.on_exhausted == "finish" else "running trials stop at their next epoch"
        return (
            f"{fmt(self.hours)} {self.label} (budget.{self.measure}); no trial starts once they are committed, "
            f"then {then}"
        )


def budget_tag(study: StudyConfig) -> str:
    """The parent run's ``lpt.budget``: ``gpu_hours=10 on_exhausted=finish``, or ``off``."""
    limit = BudgetLimit.of(study.budget)
    return f"{limit.measure}={limit.hours:g} on_exhausted={limit.on_exhausted}" if limit else "off"


def check_budget(study: StudyConfig, profile: ProfileConfig, where: str) -> None:
    """A GPU-hour budget on trials that ask for no GPU would never be spent."""
    if study.budget.gpu_hours is not None and profile.resources.gpu == 0:
        raise ConfigError(
            f"{where}: budget.gpu_hours: the profile's trials ask for no GPU (resources.gpu: 0), "
            f"so nothing would count against it; use budget.cpu_hours (CPU-core-hours)"
        )


def measure_of(budget: Budget, resources: Resources) -> str:
    """What a search counts: its budget's measure, else GPU-hours when trials use GPUs."""
    limit = BudgetLimit.of(budget)
    return limit.measure if limit else ("gpu_hours" if resources.gpu > 0 else "cpu_hours")


# ----------------------------------------------------------------------------- ASHA's rungs
def expected_epochs(rungs: list, reduction_factor: float, max_t: int) -> float:
    """A trial's expected phase-2 epochs if each rung keeps ``1 / reduction_factor`` of the trials
    that reach it (a trial reaches milestone m at epoch ceil(m))."""
    stops = [math.ceil(m) for m in rungs] + [max_t]
    expected, reach, last = 0.0, 1.0, 0
    for stop in stops:
        expected += (stop - last) * reach
        reach, last = reach / reduction_factor, stop
    return expected


def plan_lines(
    study: StudyConfig, profile: ProfileConfig, trial_images: int, phase1_images: int, n_phase1: int
) -> list[str]:
    """The dry run's budget lines: the budget, and with ``images_per_s`` how many whole trials it
    pays for after phase 1 up front, and about how many with ASHA's early stops."""
    limit = BudgetLimit.of(study.budget)
    if limit is None:
        return []
    lines = [f"cost budget: {limit.describe()}"]
    rate = profile.images_per_s
    if not rate:
        return lines + [
            "cost budget in trials: add --set images_per_s=N (one trial's training img/s) to see "
            "how many trials it pays for"
        ]
    per = getattr(profile.resources, MEASURES[limit.measure][0]) / 3600
    trial, phase1 = trial_images / rate * per, n_phase1 * phase1_images / rate * per
    left, trials, unit = limit.hours - phase1, study.budget.trials, limit.label
    head = f"cost budget at {rate:g} img/s: phase 1 up front {fmt(phase1)} {unit} (unless cached)"
    if left < trial:
        return lines + [
            f"{head}; it leaves {fmt(max(left, 0))}, less than one whole trial ({fmt(trial)}): no trial would start"
        ]
    count = int(left // trial)
    text = f"{head}, then {count} whole trial{'s' * (count != 1)} of {fmt(trial)}"
    es, phase2 = study.early_stopping, profile.phase2
    epochs, grace = phase2.epochs, grace_epochs(es, phase2, space=study.space)
    rungs = asha_rungs(grace, es.reduction_factor, epochs) if grace is not None else []
    if rungs:
        rf = es.reduction_factor
        short = trial * expected_epochs(rungs, rf, epochs) / epochs
        full = study.baseline.enabled and study.baseline.exempt_from_early_stopping
        count = (1 if full else 0) + int((left - (trial if full else 0)) // short)
        text += (
            f", about {count} with ASHA's stops at epoch{'s' * (len(rungs) > 1)} {', '.join(map(str, rungs))} "
            f"(if each keeps 1/{rf:g} of its trials: {fmt(short)} a trial"
            + ("; the baseline runs every epoch" if full else "")
            + ")"
        )
    ends = (
        f"budget.trials ({trials}) ends the search first"
        if count >= trials
        else f"the budget ends the search before budget.trials ({trials})"
    )
    return lines + [f"{text}: {ends}"]


def given_budget(overrides: list[str]) -> dict:
    """The budget keys a command line gives (``--set budget.*``, ``--gpu-hours``, ``--cpu-hours``)
    as {key: value}; a value of None removes the key."""
    from tune.config.loading import parse_override

    given = {}
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "budget" and keys[1:] and keys[1] in BUDGET_KEYS:
            given[keys[1]] = value
    return given


def resumed_budget(study: StudyConfig, stored: Budget, given: dict) -> None:
    """``--resume`` keeps the search's budget (``stored``: its study's ``budget``) but for the keys
    this command line gives; sets them in ``study``, checked like a study file's."""
    from lpt_core.config import validate
    from tune.config.study import Budget

    budget = {k: v for k, v in study.budget.model_dump(exclude_none=True).items() if k not in BUDGET_KEYS}
    budget.update({k: getattr(stored, k) for k in BUDGET_KEYS if getattr(stored, k) is not None})
    budget.update(given)
    try:
        checked = validate(Budget, {k: v for k, v in budget.items() if v is not None}, "budget")
    except ValueError as exc:
        raise ConfigError(f"--resume: {exc}") from None
    study.budget = checked
