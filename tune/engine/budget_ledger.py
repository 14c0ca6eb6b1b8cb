"""The cost budget's accounting during a search: what the trials and phase 1 spent (search.json, the
trial table), what a resumed search may still spend, and the summary lines."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from tune.config.budget import BUDGET_KEYS, MEASURES, BudgetLimit, fmt, hours_of, measure_of
from tune.config.study import Budget
from tune.errors import ConfigError
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


class SpendLedger:
    """Wall seconds of each trial of a search (ended ones from its table, running ones from their
    results) and of its phase 1 up front, in seconds of one trial's resources."""

    def __init__(self, folder: str | Location, budget: Budget | dict | None = None):
        """``budget``: a study's ``budget`` section instead of the search's own."""
        self.folder = str(folder)
        self.trials: dict[str, dict] = {}  # trial id: wall_s, epochs, ended, seen (driver time of wall_s)
        self.reload(budget)

    def reload(self, budget: Budget | dict | None = None) -> None:
        """The budget, phase 1 and the ended trials as the search folder has them now."""
        record = load_record(self.folder)
        profile, budget = record.profile, budget or record.study_config.budget
        self.limit = BudgetLimit.of(budget)
        self.measure = measure_of(budget, profile.resources)
        self.per_s = getattr(profile.resources, MEASURES[self.measure][0]) / 3600  # hours per wall second
        self.epochs = profile.phase2.epochs
        self.phase1_s = record.phase1_task_s
        self.estimate_s = record.trial_estimate_s
        for row in _table_rows(self.folder):
            self.trials[row.trial_id] = {
                "wall_s": _finite(row.wall_s),
                "epochs": row.epochs,
                "ended": True,
                "seen": None,
            }

    def observe(self, trial_id: str, result: dict | None, ended: bool = False, now: float | None = None) -> None:
        entry = self.trials.setdefault(trial_id, {"wall_s": 0.0, "epochs": 0, "ended": False, "seen": None})
        wall = _finite((result or {}).get("time_total_s"))
        if wall > entry["wall_s"]:
            entry.update(
                wall_s=wall,
                epochs=int((result or {}).get("epoch", entry["epochs"]) or 0),
                seen=time.time() if now is None else now,
            )
        entry["ended"] = entry["ended"] or ended

    def _running(self):
        return [e for e in self.trials.values() if not e["ended"]]

    def spent_s(self, now: float) -> float:
        """Phase 1, the ended trials, and the running ones up to now."""
        live = sum(now - e["seen"] for e in self._running() if e["seen"] is not None)
        return self.phase1_s + sum(e["wall_s"] for e in self.trials.values()) + live

    def trial_s(self) -> float | None:
        """Expected seconds of one more trial: the mean of the ended ones; else the slowest pace of
        a running one over every epoch; else the ``images_per_s`` estimate; else unknown."""
        ended = [e["wall_s"] for e in self.trials.values() if e["ended"] and e["wall_s"] > 0]
        if ended:
            return sum(ended) / len(ended)
        paced = [e["wall_s"] * self.epochs / e["epochs"] for e in self._running() if e["epochs"]]
        return max(paced) if paced else self.estimate_s

    def committed_s(self, now: float) -> float:
        """What the running trials will still take to their last epoch, at their own pace (a
        trial without an epoch yet: one trial's expected seconds)."""
        whole = self.trial_s() or 0.0
        total = 0.0
        for e in self._running():
            if e["epochs"]:
                total += e["wall_s"] * (self.epochs / e["epochs"] - 1)
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
        return {"trials": {k: dict(v) for k, v in self.trials.items()}}

    def restore(self, state: dict) -> None:
        """After ``reload``: the trials a restored Tune run had seen that the table does not hold
        (running when the search stopped; their clocks restart with their next result)."""
        for tid, entry in state.get("trials", {}).items():
            self.trials.setdefault(tid, {**entry, "seen": None})


# ----------------------------------------------------------------------------- the record and the summary
def keep_in_record(record: SearchRecord, study: dict, trial_estimate_s: float | None) -> None:
    """The search's budget as this command gives it (``--resume`` may change it) and the trial
    estimate, in the record the budget's pieces read."""
    given = Budget.model_validate(study["budget"])
    budget = record.study_config.budget
    for key in BUDGET_KEYS:
        setattr(budget, key, getattr(given, key))
    record.trial_estimate_s = trial_estimate_s


def resumed_budget(study: dict, stored: Budget, given: dict) -> None:
    """``--resume`` keeps the search's budget (``stored``: its study's ``budget``) but for the keys
    this command line gives; sets them in ``study``, checked like a study file's."""
    from lpt_core.config import validate
    from tune.config.study import Budget

    budget = {k: v for k, v in study["budget"].items() if k not in BUDGET_KEYS}
    budget.update({k: getattr(stored, k) for k in BUDGET_KEYS if getattr(stored, k) is not None})
    budget.update(given)
    try:
        checked = validate(Budget, {k: v for k, v in budget.items() if v is not None}, "budget")
    except ValueError as exc:
        raise ConfigError(f"--resume: {exc}") from None
    study["budget"] = checked.model_dump(exclude_none=True)


def add_phase1(record: SearchRecord, task_seconds: float) -> None:
    record.phase1_task_s += task_seconds


def search_spent(record: SearchRecord, rows: list[TrialRow]) -> dict[str, float]:
    """``gpu_hours`` and ``cpu_hours`` of a search: phase 1 up front and every trial of its table."""
    phase1 = hours_of(record.phase1_task_s, record.profile.resources)
    return {m: phase1[m] + sum(_finite(getattr(r, m)) for r in rows) for m in MEASURES}


def outcome(record: SearchRecord, rows: list[TrialRow]) -> dict:
    """What the budget did: ``ended`` (it kept trials of budget.trials from starting), the trials
    it allowed, the hours spent; JSON, for the table's metadata and the summary."""
    budget = record.study_config.budget
    limit = BudgetLimit.of(budget)
    return {
        "measure": limit.measure if limit else None,
        "limit": limit.hours if limit else None,
        "on_exhausted": limit.on_exhausted if limit else None,
        "trials": budget.trials,
        "allowed": len(rows),
        "ended": bool(limit) and len(rows) < budget.trials,
        **search_spent(record, rows),
        "phase1": hours_of(record.phase1_task_s, record.profile.resources),
    }


def summary_lines(done: dict) -> list[str]:
    """The summary's cost line, and what the budget allowed."""
    measure = done["measure"] or ("gpu_hours" if done["gpu_hours"] > 0 else "cpu_hours")
    label = MEASURES[measure][1]
    spent = (
        f"{fmt(done[measure])} {label} (phase 1 up front {fmt(done['phase1'][measure])}, trials "
        f"{fmt(done[measure] - done['phase1'][measure])})"
    )
    if done["limit"] is None:
        return [f"cost: {spent}"]
    allowed = (
        f"it allowed {done['allowed']} of {done['trials']} trials and then ended the search"
        if done["ended"]
        else f"it allowed all {done['trials']} trials"
    )
    return [
        f"cost: {spent} of a budget of {fmt(done['limit'])} (budget.{measure}, on_exhausted: "
        f"{done['on_exhausted']}); {allowed}"
    ]


def resume_mode(mode: str, record: SearchRecord, study: dict, folder: Location) -> str:
    """``driver.resume_mode``'s answer with the budget in view: a search the budget ended
    continues (its remaining trials, as an extension) when the budget now has room again; an
    extension on a spent budget is ``finished`` (it would start no trial)."""
    room = SpendLedger(folder, study["budget"]).allows_new_trial()
    if mode == "finished" and record.budget_ended and room:
        return "extend"
    if mode == "extend" and record.state == "finished" and not room:
        return "finished"
    return mode


def finished_line(record: SearchRecord, study: dict, folder: Location) -> str | None:
    """For a finished search whose budget ended it or has no room to extend it: what it allowed,
    what it spent, and how to continue."""
    ledger = SpendLedger(folder, study["budget"])
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
