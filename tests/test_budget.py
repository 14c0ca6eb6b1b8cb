"""The cost budget's accounting and decisions (tune/config/budget.py, tune/engine/budget_gate.py), on real search
folders (search.json, trials.parquet) with Ray's own searcher and ASHA bracket; whole searches with a
budget are in test_search_budget.py."""

import copy
import json
import math
import pickle
import random
import time
from types import SimpleNamespace

import pytest
from optuna.distributions import FloatDistribution
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from tiny_profile import tiny_profile

from tune.config import budget as cost
from tune.config.early_stopping import asha_rungs
from tune.config.study import Budget, Resources, StudyConfig
from tune.engine import budget_gate as gate
from tune.engine import budget_ledger as ledger
from tune.engine.progress import SearchProgress
from tune.errors import ConfigError
from tune.record import load_record, save_record
from tune.trial.table import read_rows, trial_row, write_table

EPOCHS = 4
SPACE = {"margin": {"type": "float", "low": 0.0, "high": 0.5}}


def study_of(budget: dict) -> StudyConfig:
    return StudyConfig.model_validate({"budget": budget, "space": SPACE})


def search_folder(tmp_path, budget=None, resources=None, phase1_s=0.0, estimate_s=None, walls=(), ended=False):
    """A search folder as the driver leaves it: its record, and a table row per ended trial (wall seconds)."""
    resources = resources or {"cpu": 1, "gpu": 0}
    record = {
        "profile": tiny_profile(resources=resources, phase2={"epochs": EPOCHS}),
        "study_config": {
            "budget": {"trials": 6, "concurrency": 2, "max_failures": 2, **(budget or {})},
            "space": {"pool_size": {"type": "int", "low": 4, "high": 8}},
        },
        cost.PHASE1_TASK_S: phase1_s,
        cost.TRIAL_ESTIMATE_S: estimate_s,
        "budget_ended": ended,
        "state": "finished" if ended else "running",
    }
    (tmp_path / "search.json").write_text(json.dumps(record))
    rows = [
        trial_row(f"t{i}", {}, [], {"epoch": EPOCHS, "time_total_s": w}, EPOCHS, resources=Resources(**resources))
        for i, w in enumerate(walls)
    ]
    if rows:
        write_table(rows, tmp_path / "trials.parquet")
    return tmp_path


def optuna_search() -> OptunaSearch:
    return OptunaSearch(space={"x": FloatDistribution(0, 1)}, metric="val_acc", mode="max")


def result(epoch: int, seconds: float) -> dict:
    """A trial's result as Tune hands it to a searcher."""
    return {"val_acc": 1.0, "epoch": epoch, "training_iteration": epoch, "time_total_s": seconds}


@pytest.mark.parametrize(
    "grace, rf, max_t", [(1, 2, 4), (1, 2, 90), (9, 2, 90), (1, 3, 27), (2, 2.5, 50), (5, 2, 5), (1, 4, 100), (3, 2, 4)]
)
def test_asha_rungs_are_rays_milestones(grace, rf, max_t):
    ray_rungs = sorted(m for m, _ in _Bracket(grace, max_t, rf, 0)._rungs if m < max_t)
    assert asha_rungs(grace, rf, max_t) == ray_rungs
    assert asha_rungs(9, 2, 90) == [9, 18, 36, 72]


@pytest.mark.parametrize("grace, rf, max_t", [(1, 2, 4), (1, 2, 16), (2, 3, 30), (9, 2, 90)])
def test_expected_epochs_is_what_rays_bracket_lets_trials_run(grace, rf, max_t):
    """Ray's own ASHA bracket over 4000 trials of random quality: the mean epochs a trial runs (within
    5%: the first trials at a rung pass with no cutoff, which tells more the more rungs there are)."""
    rng = random.Random(0)
    bracket, ran = _Bracket(grace, max_t, rf, 0), []
    for i in range(4000):
        trial, score = SimpleNamespace(trial_id=str(i)), rng.random()
        epoch = 0
        while epoch < max_t:
            epoch += 1
            if bracket.on_result(trial, epoch, score) == TrialScheduler.STOP:
                break
        ran.append(epoch)
    expected = cost.expected_epochs(asha_rungs(grace, rf, max_t), rf, max_t)
    assert sum(ran) / len(ran) == pytest.approx(expected, rel=0.05)
    assert cost.expected_epochs([1, 2], 2, 4) == 1 + 1 / 2 + 2 / 4


def test_trial_rows_carry_their_cost():
    row = trial_row("a", {}, [], {"epoch": 2, "time_total_s": 7200.0}, 4, resources=Resources(cpu=4, gpu=0.5))
    assert (row.gpu_hours, row.cpu_hours) == (1.0, 8.0)
    assert math.isnan(trial_row("b", {}, [], None, 4, resources=Resources(cpu=1, gpu=1)).gpu_hours)
    assert trial_row("c", {}, [], {"epoch": 2}, 4, budget_stopped=True).status == "budget_stopped"
    assert trial_row("d", {}, [], {"epoch": 4}, 4, budget_stopped=True).status == "completed"


def test_the_ledger_counts_phase1_ended_and_running_trials(tmp_path):
    folder = search_folder(tmp_path, {"cpu_hours": 1.3}, {"cpu": 2, "gpu": 0}, phase1_s=360, walls=[720])
    spend = ledger.SpendLedger(folder)
    now = time.time()
    spend.observe("r", {"time_total_s": 100.0, "epoch": 1}, now=now)  # 1 of 4 epochs in 100 s
    assert spend.spent_s(now) == 360 + 720 + 100
    assert spend.spent(now) == pytest.approx(1180 * 2 / 3600)
    assert spend.committed_s(now) == pytest.approx(300)  # its 3 epochs left at its pace
    assert spend.trial_s() == 720  # the mean of the ended trials
    assert spend.allows_new_trial(now)  # (1180 + 300 + 720) x 2 CPU = 1.22 h <= 1.3
    assert spend.spent_s(now + 10) == 1190  # it runs on between results
    spend.limit = cost.BudgetLimit("cpu_hours", 1.2, "finish")
    assert not spend.allows_new_trial(now) and not spend.exhausted(now)
    assert ledger.SpendLedger(search_folder(tmp_path, {"cpu_hours": 0.2}, phase1_s=720)).exhausted()


def test_the_searcher_holds_trials_back_while_the_budget_has_no_room(tmp_path):
    """Ray's OptunaSearch inside; a whole trial is 100 s (images_per_s) until trials have ended."""
    folder = search_folder(tmp_path, {"cpu_hours": 250 / 3600}, estimate_s=100.0)
    searcher = gate.BudgetSearcher(optuna_search(), folder)
    assert isinstance(searcher.suggest("a"), dict) and isinstance(searcher.suggest("b"), dict)  # 100 + 100 + 0
    assert searcher.suggest("c") is None and searcher.held_back  # a, b and c would be 300 s: wait
    searcher.on_trial_result("a", result(2, 50.0))
    assert searcher.suggest("c") is None
    searcher.on_trial_complete("a", result(2, 60.0))  # stopped early: 60 s
    assert isinstance(searcher.suggest("c"), dict)  # 60 spent + 60 (b) + 60 (one more) fit
    restored = copy.deepcopy(searcher)  # Tune restores the wrapped searcher on its own ...
    restored.ledger = restored.live = None
    restored.set_state(pickle.loads(pickle.dumps(searcher.get_state())))  # ... and the wrapper from its state
    assert restored.live == {"b", "c"}
    for s in (searcher, restored):  # the same answers after a restore
        assert isinstance(s.suggest("d"), dict)  # 60 + 3 x 60: 240 s fit in 250
        assert s.suggest("e") is None  # 60 + 4 x 60 do not
        for tid in "bcd":
            s.on_trial_complete(tid, result(4, 200.0))
        assert s.suggest("e") == Searcher.FINISHED  # 660 s spent, nothing runs


def test_a_raised_budget_reaches_a_restored_searcher(tmp_path):
    folder = search_folder(tmp_path, {"cpu_hours": 0.01}, walls=[100.0])
    searcher = gate.BudgetSearcher(optuna_search(), folder)
    assert searcher.suggest("b") == Searcher.FINISHED
    search_folder(tmp_path, {"cpu_hours": 1.0}, walls=[100.0])  # --resume --cpu-hours 1 rewrites the record
    searcher.set_state(searcher.get_state())
    assert isinstance(searcher.suggest("b"), dict)


def test_the_stopper_stops_running_trials_once_spent_only_when_asked(tmp_path):
    stop = gate.BudgetStopper(search_folder(tmp_path, {"cpu_hours": 100 / 3600, "on_exhausted": "stop"}))
    assert not stop("a", {"time_total_s": 60.0, "epoch": 1})
    assert stop("b", {"time_total_s": 50.0, "epoch": 1}) and stop.stopped == {"b"}
    assert stop("a", {"time_total_s": 70.0, "epoch": 2}) and stop.stopped == {"a", "b"}
    assert not stop.stop_all()
    finish = gate.BudgetStopper(search_folder(tmp_path, {"cpu_hours": 100 / 3600}))
    assert not finish("a", {"time_total_s": 500.0, "epoch": 1})
    assert pickle.loads(pickle.dumps(stop)).ledger.limit.on_exhausted == "finish"  # re-read from the folder


def test_the_progress_line_shows_the_hours(tmp_path):
    folder = search_folder(tmp_path, {"gpu_hours": 10}, {"cpu": 4, "gpu": 1}, phase1_s=3600)
    trial = Trial("f", config={"pool_size": 8}, stub=True)
    trial.update_last_result({"val_acc": 80.0, "epoch": 1, "time_total_s": 8280.0})
    progress = SearchProgress(6, EPOCHS, "val_acc", "max", ["pool_size"], meter=gate.BudgetMeter(folder))
    # 1 + 2.3 h spent; the trial's 3 epochs left take 6.9 h and one more trial 9.2 h: no room in 10
    line = progress.line([trial])
    assert line.endswith("; GPU-hours 3.3 of 10 (no room for another trial)")
    assert ", 0 pending, 6 the cost budget will not start;" in line, line  # the trial is a stub: not running
    roomy = gate.BudgetMeter(search_folder(tmp_path, {"gpu_hours": 20}, {"cpu": 4, "gpu": 1}, phase1_s=3600))
    assert roomy.text([trial]) == "GPU-hours 3.3 of 20"
    no_budget = gate.BudgetMeter(search_folder(tmp_path, None, {"cpu": 4, "gpu": 1}, phase1_s=3600))
    assert no_budget.text([trial]) == "GPU-hours 3.3"
    assert gate.BudgetMeter(search_folder(tmp_path, None, phase1_s=3600)).text([trial]) is None  # CPU, no budget


def test_resume_keeps_the_budget_unless_the_command_gives_one(tmp_path):
    study = StudyConfig.model_validate({"budget": {"trials": 6, "concurrency": 2, "max_failures": 2}, "space": SPACE})
    raw = {"trials": 6, "concurrency": 2, "max_failures": 2, "gpu_hours": 10.0, "on_exhausted": "stop"}
    stored = Budget.model_validate(raw)
    cost.resumed_budget(study, stored, {})  # the record's budget
    assert study.budget.model_dump(exclude_none=True) == {**raw}
    cost.resumed_budget(study, stored, cost.given_budget(["budget.cpu_hours=2", "budget.gpu_hours=null"]))
    assert (study.budget.gpu_hours, study.budget.cpu_hours) == (None, 2.0)
    with pytest.raises(ConfigError, match="^--resume: budget.cpu_hours: give gpu_hours or cpu_hours, not both"):
        cost.resumed_budget(study, stored, cost.given_budget(["budget.cpu_hours=2"]))


def test_a_search_its_budget_ended_continues_when_the_budget_has_room(tmp_path):
    folder = search_folder(tmp_path, {"cpu_hours": 0.05}, walls=[100.0, 100.0], ended=True)
    record = load_record(folder)
    spent = study_of({"trials": 6, "cpu_hours": 0.05})
    assert ledger.resume_mode("finished", record, spent, folder) == "finished"  # 200 s = 0.056 h spent
    assert ledger.resume_mode("extend", record, spent, folder) == "finished"  # no trial would start
    assert ledger.resume_mode("finished", record, study_of({"trials": 6, "cpu_hours": 1}), folder) == "extend"
    assert ledger.resume_mode("resume", record, spent, folder) == "resume"
    line = ledger.finished_line(record, spent, folder)
    assert line == (
        "its budget ended it after 2 of 6 trials (0.0556 of 0.05 CPU-core-hours spent, a trial takes "
        "about 0.0278); raise it with --resume --cpu-hours H"
    )
    roomy = study_of({"trials": 6, "cpu_hours": 0.08})  # room, but not for a 100 s trial
    assert ledger.resume_mode("finished", record, roomy, folder) == "finished"
    done = record.model_copy(update={"budget_ended": False})  # all trials ran; --trials 8 on no room
    assert ledger.resume_mode("extend", done, roomy, folder) == "finished"
    assert ledger.finished_line(done, roomy, folder).startswith(
        "its budget has no room for another trial (0.0556 of 0.08 CPU-core-hours spent"
    )
    assert ledger.finished_line(done, study_of({"trials": 6}), folder) is None


def test_the_outcome_and_summary_say_what_the_budget_allowed(tmp_path):
    folder = search_folder(tmp_path, {"cpu_hours": 0.05}, phase1_s=36.0, walls=[90.0, 54.0])
    record = load_record(folder)
    rows = [
        trial_row(f"t{i}", {}, [], {"epoch": 4, "time_total_s": w}, 4, resources=Resources(cpu=1, gpu=0))
        for i, w in enumerate([90.0, 54.0])
    ]
    done = ledger.outcome(record, rows)
    assert done.ended and done.allowed == 2 and done.cpu_hours == pytest.approx(0.05)
    assert ledger.summary_lines(done) == [
        "cost: 0.05 CPU-core-hours (phase 1 up front 0.01, trials 0.04) of a "
        "budget of 0.05 (budget.cpu_hours, on_exhausted: finish); it allowed 2 of "
        "6 trials and then ended the search"
    ]
    assert ledger.Outcome.model_validate_json(done.to_json()) == done
    assert list(json.loads(done.to_json())) == [  # the table's lpt.budget metadata, as before
        *("measure", "limit", "on_exhausted", "trials", "allowed", "ended", "gpu_hours", "cpu_hours", "phase1")
    ]


def test_confirm_seeds_are_counted_in_what_the_search_spent(tmp_path, monkeypatch):
    """``--confirm``: the seeds' wall seconds go into the record and every figure of spent (the
    ledger the gate asks, the summary's cost line, the parent run's hours)."""
    from tune.engine import confirmation

    monkeypatch.setattr(confirmation, "confirm_seed", lambda setup, config, seed: time.sleep(0.05) or {"seed": seed})
    out, seconds = confirmation.timed_confirm_seed(None, {}, 3)
    assert out == {"seed": 3} and seconds >= 0.05  # each seed's task times itself
    folder = search_folder(tmp_path, {"cpu_hours": 0.1}, phase1_s=36.0, walls=[90.0, 54.0])
    record, rows = load_record(folder), list(read_rows(folder / "trials.parquet").values())
    summary = {"cpu_hours": 0.05, "confirm_seeds": 3}
    line = ledger.add_confirmation(record, 180.0, rows, summary)  # 3 seeds x 2 configs x 30 s
    assert record.confirm_task_s == 180.0 and summary["cpu_hours"] == pytest.approx(0.1)
    assert line == [
        "  cost of the confirmation: 0.05 CPU-core-hours; the search has spent 0.1 CPU-core-hours in all "
        "(phase 1, trials and confirmation seeds)"
    ]
    save_record(folder, record)
    assert ledger.SpendLedger(folder).spent() == pytest.approx(0.1)  # an extension starts from it
    assert not ledger.SpendLedger(folder).allows_new_trial()
    done = ledger.outcome(record, rows)
    assert done.confirm == {"gpu_hours": 0.0, "cpu_hours": pytest.approx(0.05)}
    assert ledger.summary_lines(done)[0].startswith(
        "cost: 0.1 CPU-core-hours (phase 1 up front 0.01, trials 0.04, confirmation seeds 0.05) of a budget of 0.1"
    )
