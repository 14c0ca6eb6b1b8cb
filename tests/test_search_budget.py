"""Whole searches with a cost budget, on a real local Ray and a real MLflow store (slow).

Each runs on a copy of the session's smoke search (its phase 1 is cached there, so every hour
spent is a trial's), with the budget sized from what that search's trials cost on this machine.
"""

import json
import math
import re

import pyarrow.parquet as pq
import pytest
from smoke_search import run_search, runs_of

pytestmark = pytest.mark.slow
TRIALS = 6


def search_folder(copy):
    """The newest search folder of a copy (the copied smoke search is the older one)."""
    return sorted(p for p in (copy.cwd / "runs").iterdir() if (p / "search.json").exists())[-1]


def newest_parent(client):
    return max(runs_of(client, "study"), key=lambda r: r.info.start_time)


def test_a_cpu_hour_budget_stops_starting_trials_then_resume_raises_it(smoke_search, tmp_path):
    assert smoke_search.returncode == 0, smoke_search.stderr[-2000:]
    walls = [r["wall_s"] for r in pq.read_table(smoke_search.folder / "trials.parquet").to_pylist()]
    # one trial's cost here (1 CPU each): the two that start before any cost is known spend it, so
    # no third starts unless this search's trials run three times as fast as the reference's (half
    # of the six, the earlier choice, let a machine twice as quiet fit all six)
    budget = sum(walls) / len(walls) / 3600
    copy = smoke_search.copy_to(tmp_path)
    proc = run_search(
        copy.cwd, "--study", "prompt_pool", "--trials", str(TRIALS), "--set", f"budget.cpu_hours={budget:.6f}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = search_folder(copy)
    table = pq.read_table(folder / "trials.parquet")
    rows = table.to_pylist()
    allowed = len(rows)
    assert 2 <= allowed < TRIALS, proc.stdout[-3000:]  # two start before any cost is known (concurrency 2)
    assert {r["status"] for r in rows} <= {"completed", "early_stopped"}  # none failed, none counted as failed
    spent = sum(r["cpu_hours"] for r in rows)
    assert all(r["cpu_hours"] == pytest.approx(r["wall_s"] / 3600) and r["gpu_hours"] == 0 for r in rows)

    # the table, the parent run and the summary say what the budget did
    outcome = json.loads(table.schema.metadata[b"lpt.budget"])
    assert outcome["ended"] and outcome["allowed"] == allowed and outcome["trials"] == TRIALS
    assert outcome["cpu_hours"] == pytest.approx(spent) and outcome["phase1"]["cpu_hours"] == 0  # phase 1 cached
    client = copy.client()
    parent = newest_parent(client)
    assert parent.data.metrics["cpu_hours"] == pytest.approx(spent)
    assert parent.data.metrics["trials_not_started"] == TRIALS - allowed
    assert parent.data.tags["lpt.budget_ended"] == "true"
    assert parent.data.tags["lpt.budget"] == f"cpu_hours={float(f'{budget:.6f}'):g} on_exhausted=finish"
    trial_runs = [r for r in runs_of(client, "trial") if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    by_id = {r["trial_id"]: r for r in rows}
    assert len(trial_runs) == allowed
    assert all(
        r.data.metrics["cpu_hours"] == pytest.approx(by_id[r.data.tags["lpt.trial_id"]]["cpu_hours"])
        for r in trial_runs
    )
    summary = re.search(
        r"^cost: (\S+) CPU-core-hours \(phase 1 up front 0, trials (\S+)\) of a budget of (\S+) "
        r"\(budget.cpu_hours, on_exhausted: finish\); it allowed (\d) of 6 trials and then ended the "
        r"search$",
        proc.stdout,
        re.M,
    )
    assert summary, proc.stdout[-3000:]
    assert float(summary[1]) == pytest.approx(spent, rel=0.01) and int(summary[4]) == allowed
    assert re.search(r"; CPU-core-hours \S+ of \S+ \(no room for another trial\)", proc.stdout)

    # --resume as it is: finished, and how to run the rest; with a higher budget it runs them
    again = run_search(copy.cwd, "--study", "prompt_pool", "--trials", str(TRIALS), "--resume")
    assert again.returncode == 0 and "is finished" in again.stdout, again.stderr[-2000:]
    assert f"its budget ended it after {allowed} of 6 trials" in again.stdout
    assert "raise it with --resume --cpu-hours H" in again.stdout
    more = run_search(copy.cwd, "--study", "prompt_pool", "--trials", str(TRIALS), "--resume", "--cpu-hours", "1")
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"extending {folder.name} by {TRIALS - allowed} trials to {TRIALS}" in more.stdout
    assert len(pq.read_table(folder / "trials.parquet")) == TRIALS
    parent = client.get_run(parent.info.run_id)
    assert parent.data.metrics["trials_not_started"] == 0 and parent.data.tags["lpt.budget_ended"] == "false"
    assert parent.data.tags["lpt.budget"] == "cpu_hours=1 on_exhausted=finish"
    assert "it allowed all 6 trials" in more.stdout


def test_on_exhausted_stop_stops_the_running_trials(smoke_search, tmp_path):
    """A budget smaller than one epoch: the two trials that start before any cost is known stop at
    their first epoch, as budget_stopped, and no other trial starts."""
    assert smoke_search.returncode == 0, smoke_search.stderr[-2000:]
    copy = smoke_search.copy_to(tmp_path)
    proc = run_search(
        copy.cwd,
        "--study",
        "prompt_pool",
        "--trials",
        str(TRIALS),
        "--cpu-hours",
        "0.0002",
        "--set",
        "budget.on_exhausted=stop",
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # no trial completed: nothing to evaluate on test
    rows = pq.read_table(search_folder(copy) / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "budget_stopped" and r["epochs"] >= 1 for r in rows), rows
    assert all(math.isfinite(r["val_acc"]) for r in rows)  # the epoch each ran is kept
    assert "2 trials: 0 completed, 0 stopped early by ASHA, 0 failed, 2 stopped by the budget" in proc.stdout
    assert "no trial completed: the budget stopped 2 before their last epoch" in proc.stdout
    client = copy.client()
    parent = newest_parent(client)
    assert parent.data.metrics["trials_budget_stopped"] == 2 and parent.data.metrics["trials_failed"] == 0
    statuses = {
        r.data.tags["lpt.status"]
        for r in runs_of(client, "trial")
        if r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    }
    assert statuses == {"budget_stopped"}
