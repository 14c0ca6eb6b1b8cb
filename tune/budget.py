"""A search's cost in GPU-hours (or CPU-core-hours) and the budget that caps it.

Spent = the wall time of each trial x its ``resources.gpu`` (``resources.cpu`` for CPU-core-hours),
plus each phase-1 training up front x the same resources (``record["phase1_task_s"]``). A study's
``budget.gpu_hours`` or ``budget.cpu_hours`` caps it (``--gpu-hours`` / ``--cpu-hours``, or
``--set budget.gpu_hours=...``): a trial starts only while the hours spent, the hours the running
trials will still take to their last epoch (at the pace each has measured), and the hours of one
more trial (the mean of the trials ended so far; before any ended, a running one's pace or the
profile's ``images_per_s``) fit in the budget. Once they no longer fit, no new trial starts; the
running ones finish (``on_exhausted: finish``) or stop at their next epoch when the hours are
spent (``stop``). A trial the budget kept from starting is no trial at all: no row, no failure.

``SpendLedger`` does the accounting from the search folder (``search.json``, ``trials.parquet``)
and the results Tune reports; ``tune.budget_gate`` holds the Ray Tune pieces built on it. The dry
run's lines (``plan_lines``) use ASHA's rungs (``early_stopping.asha_rungs``) for the count ASHA's early stops let it pay for.
This module imports no Ray: a dry run checks and describes a budget without it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from lpt_core.config import PhaseConfig

from .early_stopping import asha_rungs, grace_epochs
from .names import SEARCH_FILE, TABLE_FILE
from .study_config import ConfigError

# measure: (the resources key it multiplies the wall time by, its name in words)
MEASURES = {"gpu_hours": ("gpu", "GPU-hours"), "cpu_hours": ("cpu", "CPU-core-hours")}
PHASE1_TASK_S = "phase1_task_s"       # search.json: seconds of the phase-1 tasks trained up front, summed
TRIAL_ESTIMATE_S = "trial_estimate_s"  # search.json: a whole trial's seconds at images_per_s (or null)
BUDGET_KEYS = ("gpu_hours", "cpu_hours", "on_exhausted")   # may change on --resume


def fmt(hours: float) -> str:
    """``3.2``, ``10``, ``0.00421``, ``125``."""
    return f"{hours:.0f}" if abs(hours) >= 100 else f"{hours:.3g}"


def hours_of(seconds: float, resources: dict) -> dict[str, float]:
    """``{"gpu_hours": ..., "cpu_hours": ...}`` of ``seconds`` of wall time on ``resources``."""
    return {measure: seconds * resources[key] / 3600 for measure, (key, _) in MEASURES.items()}


# ----------------------------------------------------------------------------- the limit
@dataclass(frozen=True)
class BudgetLimit:
    measure: str          # gpu_hours | cpu_hours
    hours: float
    on_exhausted: str     # finish | stop

    @classmethod
    def of(cls, budget: dict) -> Optional["BudgetLimit"]:
        """The limit of a study's ``budget`` section; None without one."""
        for measure in MEASURES:
            if budget.get(measure) is not None:
                return cls(measure, float(budget[measure]), budget.get("on_exhausted", "finish"))
        return None

    @property
    def label(self) -> str:
        return MEASURES[self.measure][1]

    def describe(self) -> str:
        then = ("running trials finish" if self.on_exhausted == "finish"
                else "running trials stop at their next epoch")
        return (f"{fmt(self.hours)} {self.label} (budget.{self.measure}); no trial starts once they are committed, "
                f"then {then}")


def budget_tag(study: dict) -> str:
    """The parent run's ``lpt.budget``: ``gpu_hours=10 on_exhausted=finish``, or ``off``."""
    limit = BudgetLimit.of(study["budget"])
    return f"{limit.measure}={limit.hours:g} on_exhausted={limit.on_exhausted}" if limit else "off"


def check_budget(study: dict, profile: dict, where: str) -> None:
    """A GPU-hour budget on trials that ask for no GPU would never be spent."""
    if study["budget"].get("gpu_hours") is not None and profile["resources"]["gpu"] == 0:
        raise ConfigError(f"{where}: budget.gpu_hours: the profile's trials ask for no GPU (resources.gpu: 0), "
                          f"so nothing would count against it; use budget.cpu_hours (CPU-core-hours)")


def measure_of(budget: dict, resources: dict) -> str:
    """What a search counts: its budget's measure, else GPU-hours when trials use GPUs."""
    limit = BudgetLimit.of(budget)
    return limit.measure if limit else ("gpu_hours" if resources["gpu"] > 0 else "cpu_hours")


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


def plan_lines(study: dict, profile: dict, trial_images: int, phase1_images: int, n_phase1: int) -> list[str]:
    """The dry run's budget lines: the budget, and with ``images_per_s`` how many whole trials it
    pays for after phase 1 up front, and about how many with ASHA's early stops."""
    limit = BudgetLimit.of(study["budget"])
    if limit is None:
        return []
    lines = [f"cost budget: {limit.describe()}"]
    rate = profile.get("images_per_s")
    if not rate:
        return lines + ["cost budget in trials: add --set images_per_s=N (one trial's training img/s) to see "
                        "how many trials it pays for"]
    per = profile["resources"][MEASURES[limit.measure][0]] / 3600
    trial, phase1 = trial_images / rate * per, n_phase1 * phase1_images / rate * per
    left, trials, unit = limit.hours - phase1, study["budget"]["trials"], limit.label
    head = f"cost budget at {rate:g} img/s: phase 1 up front {fmt(phase1)} {unit} (unless cached)"
    if left < trial:
        return lines + [f"{head}; it leaves {fmt(max(left, 0))}, less than one whole trial ({fmt(trial)}): "
                        f"no trial would start"]
    count = int(left // trial)
    text = f"{head}, then {count} whole trial{'s' * (count != 1)} of {fmt(trial)}"
    es, phase2 = study["early_stopping"], PhaseConfig.from_dict(profile["phase2"], where="phase2")
    epochs, grace = phase2.epochs, grace_epochs(es, phase2)
    rungs = asha_rungs(grace, es["reduction_factor"], epochs) if grace is not None else []
    if rungs:
        rf = es["reduction_factor"]
        short = trial * expected_epochs(rungs, rf, epochs) / epochs
        full = study["baseline"]["enabled"] and study["baseline"]["exempt_from_early_stopping"]
        count = (1 if full else 0) + int((left - (trial if full else 0)) // short)
        text += (f", about {count} with ASHA's stops at epochs {', '.join(map(str, rungs))} "
                 f"(if each keeps 1/{rf:g} of its trials: {fmt(short)} a trial"
                 + ("; the baseline runs every epoch" if full else "") + ")")
    ends = (f"budget.trials ({trials}) ends the search first" if count >= trials
            else f"the budget ends the search before budget.trials ({trials})")
    return lines + [f"{text}: {ends}"]


# ----------------------------------------------------------------------------- the accounting
def _read_record(folder: Path) -> dict:
    return json.loads((Path(folder) / SEARCH_FILE).read_text())


def _table_rows(folder: Path) -> list[dict]:
    from .trial_table import read_rows
    return list(read_rows(Path(folder) / TABLE_FILE).values())


def _finite(value) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


class SpendLedger:
    """Wall seconds of each trial of a search (ended ones from its table, running ones from their
    results) and of its phase 1 up front, in seconds of one trial's resources."""

    def __init__(self, folder: str | Path, budget: dict | None = None):
        """``budget``: a study's ``budget`` section instead of the search's own."""
        self.folder = str(folder)
        self.trials: dict[str, dict] = {}   # trial id: wall_s, epochs, ended, seen (driver time of wall_s)
        self.reload(budget)

    def reload(self, budget: dict | None = None) -> None:
        """The budget, phase 1 and the ended trials as the search folder has them now."""
        record = _read_record(Path(self.folder))
        profile, budget = record["profile"], budget or record["study_config"]["budget"]
        self.limit = BudgetLimit.of(budget)
        self.measure = measure_of(budget, profile["resources"])
        self.per_s = profile["resources"][MEASURES[self.measure][0]] / 3600   # hours per wall second
        self.epochs = PhaseConfig.from_dict(profile["phase2"], where="phase2").epochs
        self.phase1_s = float(record.get(PHASE1_TASK_S, 0.0))
        self.estimate_s = record.get(TRIAL_ESTIMATE_S)
        for row in _table_rows(Path(self.folder)):
            self.trials[row["trial_id"]] = {"wall_s": _finite(row.get("wall_s")), "epochs": int(row["epochs"] or 0),
                                            "ended": True, "seen": None}

    def observe(self, trial_id: str, result: dict | None, ended: bool = False, now: float | None = None) -> None:
        entry = self.trials.setdefault(trial_id, {"wall_s": 0.0, "epochs": 0, "ended": False, "seen": None})
        wall = _finite((result or {}).get("time_total_s"))
        if wall > entry["wall_s"]:
            entry.update(wall_s=wall, epochs=int((result or {}).get("epoch", entry["epochs"]) or 0),
                         seen=time.time() if now is None else now)
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
def keep_in_record(record: dict, study: dict, trial_estimate_s: float | None) -> None:
    """The search's budget as this command gives it (``--resume`` may change it) and the trial
    estimate, in the record the budget's pieces read."""
    given = {key: study["budget"][key] for key in BUDGET_KEYS if study["budget"].get(key) is not None}
    budget = record["study_config"]["budget"]
    for key in BUDGET_KEYS:
        budget.pop(key, None)
    budget.update(given)
    record[TRIAL_ESTIMATE_S] = trial_estimate_s


def given_budget(overrides: list[str]) -> dict:
    """The budget keys a command line gives (``--set budget.*``, ``--gpu-hours``, ``--cpu-hours``)
    as {key: value}; a value of None removes the key."""
    from .study_config import parse_override
    given = {}
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "budget" and keys[1:] and keys[1] in BUDGET_KEYS:
            given[keys[1]] = value
    return given


def resumed_budget(study: dict, stored: dict, given: dict) -> None:
    """``--resume`` keeps the search's budget (``stored``: its study's ``budget``) but for the keys
    this command line gives; sets them in ``study``, checked like a study file's."""
    from lpt_core.config import validate

    from .study_config import Budget
    budget = {k: v for k, v in study["budget"].items() if k not in BUDGET_KEYS}
    budget.update({k: stored[k] for k in BUDGET_KEYS if stored.get(k) is not None})
    budget.update(given)
    try:
        checked = validate(Budget, {k: v for k, v in budget.items() if v is not None}, "budget")
    except ValueError as exc:
        raise ConfigError(f"--resume: {exc}") from None
    study["budget"] = checked.model_dump(exclude_none=True)


def add_phase1(record: dict, task_seconds: float) -> None:
    record[PHASE1_TASK_S] = float(record.get(PHASE1_TASK_S, 0.0)) + task_seconds


def search_spent(record: dict, rows: list[dict]) -> dict[str, float]:
    """``gpu_hours`` and ``cpu_hours`` of a search: phase 1 up front and every trial of its table."""
    phase1 = hours_of(float(record.get(PHASE1_TASK_S, 0.0)), record["profile"]["resources"])
    return {m: phase1[m] + sum(_finite(r.get(m)) for r in rows) for m in MEASURES}


def outcome(record: dict, rows: list[dict]) -> dict:
    """What the budget did: ``ended`` (it kept trials of budget.trials from starting), the trials
    it allowed, the hours spent; JSON, for the table's metadata and the summary."""
    budget = record["study_config"]["budget"]
    limit = BudgetLimit.of(budget)
    return {"measure": limit.measure if limit else None, "limit": limit.hours if limit else None,
            "on_exhausted": limit.on_exhausted if limit else None, "trials": budget["trials"],
            "allowed": len(rows), "ended": bool(limit) and len(rows) < budget["trials"],
            **search_spent(record, rows),
            "phase1": hours_of(float(record.get(PHASE1_TASK_S, 0.0)), record["profile"]["resources"])}


def summary_lines(done: dict) -> list[str]:
    """The summary's cost line, and what the budget allowed."""
    measure = done["measure"] or ("gpu_hours" if done["gpu_hours"] > 0 else "cpu_hours")
    label = MEASURES[measure][1]
    spent = (f"{fmt(done[measure])} {label} (phase 1 up front {fmt(done['phase1'][measure])}, trials "
             f"{fmt(done[measure] - done['phase1'][measure])})")
    if done["limit"] is None:
        return [f"cost: {spent}"]
    allowed = (f"it allowed {done['allowed']} of {done['trials']} trials and then ended the search"
               if done["ended"] else f"it allowed all {done['trials']} trials")
    return [f"cost: {spent} of a budget of {fmt(done['limit'])} (budget.{measure}, on_exhausted: "
            f"{done['on_exhausted']}); {allowed}"]


def resume_mode(mode: str, record: dict, study: dict, folder: Path) -> str:
    """``driver.resume_mode``'s answer with the budget in view: a search the budget ended
    continues (its remaining trials, as an extension) when the budget now has room again; an
    extension on a spent budget is ``finished`` (it would start no trial)."""
    room = SpendLedger(folder, study["budget"]).allows_new_trial()
    if mode == "finished" and record.get("budget_ended") and room:
        return "extend"
    if mode == "extend" and record.get("state") == "finished" and not room:
        return "finished"
    return mode


def finished_line(record: dict, study: dict, folder: Path) -> str | None:
    """For a finished search whose budget ended it or has no room to extend it: what it allowed,
    what it spent, and how to continue."""
    ledger = SpendLedger(folder, study["budget"])
    if ledger.limit is None or not (record.get("budget_ended") or not ledger.allows_new_trial()):
        return None
    what = (f"its budget ended it after {len(_table_rows(folder))} of {record['study_config']['budget']['trials']} "
            f"trials" if record.get("budget_ended") else "its budget has no room for another trial")
    return (f"{what} ({fmt(ledger.spent())} of {fmt(ledger.limit.hours)} {ledger.limit.label} spent, a trial "
            f"takes about {fmt(ledger.hours(ledger.trial_s() or 0))}); raise it with --resume "
            f"--{ledger.measure.replace('_', '-')} H")
