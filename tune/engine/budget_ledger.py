"""The cost budget's accounting: the one place that says what a search has spent.

Spent, in seconds of one trial's resources: phase 1 trained up front (``SearchRecord.phase1_task_s``),
each trial's wall time (ended ones from the table, running ones from their results, up to now) and
the ``--confirm`` seeds (``SearchRecord.confirm_task_s``); in hours, those seconds x the trial's
``resources`` (``tune.config.budget.hours_of``). ``SpendLedger`` holds it; the gate
(``tune.engine.budget_gate``) asks it whether a trial may start or must stop, the wrap-up asks it
for the summary (``outcome``, ``summary_lines``) and ``--resume`` for what is left. The planning,
the limit and the dry run's estimates are ``tune.config.budget``'s.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel

from tune.config.budget import BUDGET_KEYS, MEASURES, BudgetLimit, fmt, hours_of, measure_of
from tune.config.study import Budget, StudyConfig
from tune.names import TABLE_FILE
from tune.record import SearchRecord, load_record
from tune.storage import Location, location

if TYPE_CHECKING:  # the table imports Ray: read only where the rows are
    from tune.trial.table import TrialRow


# ----------------------------------------------------------------------------- the accounting
def _table_rows(folder: str | Location) -> list[TrialRow]:
    from tune.trial.table import read_rows

    return list(read_rows(location(folder) / TABLE_FILE).values())


def _finite(value) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


@dataclass
class _Spend:
    """One trial's spending: its wall seconds so far, its epochs, whether it ended, and the
    driver's time when ``wall_s`` was reported (a running trial spends on from there)."""

    wall_s: float = 0.0
    epochs: int = 0
    ended: bool = False
    seen: float | None = None


class SpendLedger:
    """Wall seconds of each trial of a search (ended ones from its table, running ones from their
    results), of its phase 1 up front and of its confirmation seeds, in seconds of one trial's
    resources."""

    def __init__(self, folder: str | Location | None, budget: Budget | None = None):
        """``budget``: a study's ``budget`` section instead of the search's own; ``folder`` None:
        filled by ``of`` instead."""
        self.folder = "" if folder is None else str(folder)
        self.trials: dict[str, _Spend] = {}
        if folder is not None:
            self.reload(budget)

    @classmethod
    def of(cls, record: SearchRecord, rows: list[TrialRow], budget: Budget | None = None) -> SpendLedger:
        """The ledger of a record and its table's rows as the driver holds them."""
        ledger = cls(None)
        ledger._take(record, rows, budget)
        return ledger

    def reload(self, budget: Budget | None = None) -> None:
        """The budget, phase 1 and the ended trials as the search folder has them now."""
        self._take(load_record(self.folder), _table_rows(self.folder), budget)

    def _take(self, record: SearchRecord, rows: list[TrialRow], budget: Budget | None) -> None:
        profile, budget = record.profile, budget or record.study_config.budget
        self.resources = profile.resources
        self.limit = BudgetLimit.of(budget)
        self.measure = measure_of(budget, profile.resources)
        self.per_s = getattr(profile.resources, MEASURES[self.measure][0]) / 3600  # hours per wall second
        self.epochs = profile.phase2.epochs
        self.phase1_s, self.confirm_s = record.phase1_task_s, record.confirm_task_s
        self.estimate_s = record.trial_estimate_s
        for row in rows:
            self.trials[row.trial_id] = _Spend(wall_s=_finite(row.wall_s), epochs=row.epochs, ended=True)

    def observe(self, trial_id: str, result: dict | None, ended: bool = False, now: float | None = None) -> None:
        entry = self.trials.setdefault(trial_id, _Spend())
        result = result or {}  # Tune's result: the trial's edge
        wall = _finite(result.get("time_total_s"))
        if wall > entry.wall_s:
            entry.wall_s, entry.epochs = wall, int(result.get("epoch", entry.epochs) or 0)
            entry.seen = time.time() if now is None else now
        entry.ended = entry.ended or ended

    def _running(self) -> list[_Spend]:
        return [e for e in self.trials.values() if not e.ended]

    def trials_s(self, now: float) -> float:
        """The trials: the ended ones, and the running ones up to now."""
        live = sum(now - e.seen for e in self._running() if e.seen is not None)
        return sum(e.wall_s for e in self.trials.values()) + live

    def spent_s(self, now: float) -> float:
        """Phase 1, the confirmation seeds and the trials."""
        return self.phase1_s + self.confirm_s + self.trials_s(now)

    def spent_by_measure(self, now: float | None = None) -> dict[str, float]:
        """``gpu_hours`` and ``cpu_hours`` spent (the summary's and the parent run's)."""
        return hours_of(self.spent_s(time.time() if now is None else now), self.resources)

    def trial_s(self) -> float | None:
        """Expected seconds of one more trial: the mean of the ended ones; else the slowest pace of
        a running one over every epoch; else the ``images_per_s`` estimate; else unknown."""
        ended = [e.wall_s for e in self.trials.values() if e.ended and e.wall_s > 0]
        if ended:
            return sum(ended) / len(ended)
        paced = [e.wall_s * self.epochs / e.epochs for e in self._running() if e.epochs]
        return max(paced) if paced else self.estimate_s

    def committed_s(self, now: float) -> float:
        """What the running trials will still take to their last epoch, at their own pace (a
        trial without an epoch yet: one trial's expected seconds)."""
        whole = self.trial_s() or 0.0
        total = 0.0
        for e in self._running():
            if e.epochs:
                total += e.wall_s * (self.epochs / e.epochs - 1)
            else:
                total += whole
        return total

    def hours(self, seconds: float) -> float:
        return seconds * self.per_s

    def spent(self, now: float | None = None) -> float:
        return self.hours(self.spent_s(time.time() if now is None else now))

    def allows_new_trial(self, now: float | None = None) -> bool:
        if self.limit is None:
            return True
        now = time.time() if now is None else now
        return self.hours(self.spent_s(now) + self.committed_s(now) + (self.trial_s() or 0.0)) <= self.limit.hours

    def exhausted(self, now: float | None = None) -> bool:
        return self.limit is not None and self.spent(now) >= self.limit.hours

    def state(self) -> dict:
        return {"trials": {k: asdict(v) for k, v in self.trials.items()}}

    def restore(self, state: dict) -> None:
        """After ``reload``: the trials a restored Tune run had seen that the table does not hold
        (running when the search stopped; their clocks restart with their next result)."""
        for tid, entry in state.get("trials", {}).items():
            self.trials.setdefault(tid, _Spend(**{**entry, "seen": None}))


# ----------------------------------------------------------------------------- the record and the summary
def keep_in_record(record: SearchRecord, study: StudyConfig, trial_estimate_s: float | None) -> None:
    """The search's budget as this command gives it (``--resume`` may change it) and the trial
    estimate, in the record the budget's pieces read."""
    given = study.budget
    budget = record.study_config.budget
    for key in BUDGET_KEYS:
        setattr(budget, key, getattr(given, key))
    record.trial_estimate_s = trial_estimate_s


def add_phase1(record: SearchRecord, task_seconds: float) -> None:
    record.phase1_task_s += task_seconds


def search_spent(record: SearchRecord, rows: list[TrialRow]) -> dict[str, float]:
    """``gpu_hours`` and ``cpu_hours`` of a search: phase 1 up front, every trial of its table and
    its confirmation seeds (``SpendLedger``'s spent)."""
    return SpendLedger.of(record, rows).spent_by_measure()


class Outcome(BaseModel):
    """What the budget did: ``ended`` (it kept trials of budget.trials from starting), the trials
    it allowed, the hours spent in all and on phase 1 up front and on confirmation seeds (by
    measure); its JSON is the trial table's ``lpt.budget`` metadata."""

    measure: str | None
    limit: float | None
    on_exhausted: str | None
    trials: int
    allowed: int
    ended: bool
    gpu_hours: float
    cpu_hours: float
    phase1: dict[str, float]
    confirm: dict[str, float] | None = None  # only once --confirm ran

    def spent(self, measure: str) -> float:
        return getattr(self, measure)

    def to_json(self) -> str:  # the table metadata's edge: as json.dumps wrote the dict before
        return json.dumps(self.model_dump(exclude={"confirm"} if self.confirm is None else set()))


def outcome(record: SearchRecord, rows: list[TrialRow]) -> Outcome:
    """What the budget did and what the search spent (``SpendLedger``), for the summary and the
    table's metadata."""
    budget = record.study_config.budget
    limit = BudgetLimit.of(budget)
    resources = record.profile.resources
    return Outcome(
        measure=limit.measure if limit else None,
        limit=limit.hours if limit else None,
        on_exhausted=limit.on_exhausted if limit else None,
        trials=budget.trials,
        allowed=len(rows),
        ended=bool(limit) and len(rows) < budget.trials,
        **search_spent(record, rows),
        phase1=hours_of(record.phase1_task_s, resources),
        confirm=hours_of(record.confirm_task_s, resources) if record.confirm_task_s else None,
    )


def summary_lines(done: Outcome) -> list[str]:
    """The summary's cost line, and what the budget allowed."""
    measure = done.measure or ("gpu_hours" if done.gpu_hours > 0 else "cpu_hours")
    label = MEASURES[measure][1]
    phase1, confirm = done.phase1[measure], (done.confirm or {}).get(measure, 0.0)
    spent = (
        f"{fmt(done.spent(measure))} {label} (phase 1 up front {fmt(phase1)}, trials "
        f"{fmt(done.spent(measure) - phase1 - confirm)}"
        + (f", confirmation seeds {fmt(confirm)}" if done.confirm is not None else "")
        + ")"
    )
    if done.limit is None:
        return [f"cost: {spent}"]
    allowed = (
        f"it allowed {done.allowed} of {done.trials} trials and then ended the search"
        if done.ended
        else f"it allowed all {done.trials} trials"
    )
    return [
        f"cost: {spent} of a budget of {fmt(done.limit)} (budget.{measure}, on_exhausted: "
        f"{done.on_exhausted}); {allowed}"
    ]


def add_confirmation(record: SearchRecord, seconds: float, rows: list[TrialRow], summary: dict) -> list[str]:
    """``--confirm``'s seeds counted in what the search spent: their wall seconds (each seed's
    task) in the record, the parent run's ``gpu_hours``/``cpu_hours`` in ``summary`` raised to
    the new total; the summary's line."""
    record.confirm_task_s += seconds
    ledger = SpendLedger.of(record, rows)
    summary.update(ledger.spent_by_measure())
    label = MEASURES[ledger.measure][1]
    return [
        f"  cost of the confirmation: {fmt(ledger.hours(seconds))} {label}; the search has spent "
        f"{fmt(ledger.spent())} {label} in all (phase 1, trials and confirmation seeds)"
    ]


def resume_mode(mode: str, record: SearchRecord, study: StudyConfig, folder: Location) -> str:
    """``driver.resume_mode``'s answer with the budget in view: a search the budget ended
    continues (its remaining trials, as an extension) when the budget now has room again; an
    extension on a spent budget is ``finished`` (it would start no trial)."""
    room = SpendLedger(folder, study.budget).allows_new_trial()
    if mode == "finished" and record.budget_ended and room:
        return "extend"
    if mode == "extend" and record.state == "finished" and not room:
        return "finished"
    return mode


def finished_line(record: SearchRecord, study: StudyConfig, folder: Location) -> str | None:
    """For a finished search whose budget ended it or has no room to extend it: what it allowed,
    what it spent, and how to continue."""
    ledger = SpendLedger(folder, study.budget)
    if ledger.limit is None or not (record.budget_ended or not ledger.allows_new_trial()):
        return None
    what = (
        f"its budget ended it after {len(_table_rows(folder))} of {record.study_config.budget.trials} trials"
        if record.budget_ended
        else "its budget has no room for another trial"
    )
    return (
        f"{what} ({fmt(ledger.spent())} of {fmt(ledger.limit.hours)} {ledger.limit.label} spent, a trial "
        f"takes about {fmt(ledger.hours(ledger.trial_s() or 0))}); raise it with --resume "
        f"--{ledger.measure.replace('_', '-')} H"
    )
