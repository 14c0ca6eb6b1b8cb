"""The search as an operator meets it, on a real local Ray and MLflow store (slow): Ctrl+C stops it
as interrupted and --resume finishes it with nothing run twice; a finished search says so and
--trials extends it; a changed study is refused; progress lines and no tracebacks; a trial's own
error message reaches the table, its run and the summary."""

import json
import os
import signal
import subprocess
import time

import optuna
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from smoke_search import run_search, runs_of, search_argv, search_env

from tune.config.loading import load_profile

pytestmark = pytest.mark.slow
SMOKE_LENGTH = load_profile("smoke")[1].model.prompt_length  # its one phase 1

ARGS = ("--study", "prompt_pool", "--set", "phase2.epochs=2")


def table_rows(cwd):
    tables = list((cwd / "runs").glob("prompt_pool-smoke-*/trials.parquet"))
    return pq.read_table(tables[0]).to_pylist() if tables else []


def assert_quiet(text: str) -> None:
    assert "Traceback" not in text and "View run" not in text and "View experiment" not in text, text[-3000:]


def test_ctrl_c_resume_finished_and_extend(tmp_path):
    env = search_env(LPT_PROGRESS_S="5")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        # a terminal's Ctrl+C: SIGINT to the driver's whole process group
        driver = subprocess.Popen(
            search_argv(*ARGS, "--trials", "4"),
            cwd=tmp_path,
            env=env,
            start_new_session=True,
            stdout=stdout,
            stderr=stderr,
        )
        deadline = time.time() + 600
        while time.time() < deadline and not table_rows(tmp_path):
            assert driver.poll() is None, err.read_text()[-3000:]
            time.sleep(0.5)
        assert table_rows(tmp_path), "no trial ended in time"
        os.killpg(driver.pid, signal.SIGINT)
        code = driver.wait(timeout=300)
    stdout_text, stderr_text = out.read_text(), err.read_text()
    assert code == 130, stderr_text[-3000:]
    assert (
        "continue with: python tune/search.py --study prompt_pool --profile smoke --set phase2.epochs=2 --resume"
    ) in stderr_text
    assert "[search " in stdout_text and "best trial" not in stdout_text  # no wrap-up, no test evaluation
    assert_quiet(stdout_text + stderr_text)
    rows = table_rows(tmp_path)
    assert 1 <= len(rows) <= 4 and {r["status"] for r in rows} <= {"completed", "early_stopped", "interrupted"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = runs_of(client, "study")[0]
    assert parent.info.status == "KILLED" and parent.data.tags["lpt.interrupted"] == "SIGINT"
    assert "best_test_acc" not in parent.data.metrics
    for row in rows:  # a row names its run, also a trial stopped before its first epoch
        if row["mlflow_run_id"] is None:  # stopped before it even opened its run
            assert row["status"] == "interrupted" and row["epochs"] == 0
            continue
        run = client.get_run(row["mlflow_run_id"])
        assert run.info.status == ("KILLED" if row["status"] == "interrupted" else "FINISHED")

    proc = run_search(tmp_path, *ARGS, "--resume", "--confirm", "1", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_quiet(proc.stdout + proc.stderr)
    tags = runs_of(client, "study")[0].data.tags
    confirmed = tags["lpt.confirmed_trial"]
    assert (
        confirmed == tags["lpt.best_trial_id"] and "confirm_test_acc_mean" in runs_of(client, "study")[0].data.metrics
    )
    rows = table_rows(tmp_path)
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"completed", "early_stopped"}
    trials = runs_of(client, "trial")
    assert sorted(r.data.tags["lpt.trial_id"] for r in trials) == sorted(r["trial_id"] for r in rows)
    for run in trials:  # nothing ran twice: one point per epoch
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == sorted(set(steps)), steps
        assert "phase" not in run.data.metrics and "epoch" not in run.data.metrics
    assert runs_of(client, "study")[0].info.status == "FINISHED"
    assert_study_matches_table(runs_of(client, "study")[0], rows)

    proc = run_search(tmp_path, *ARGS, "--resume", timeout=300)
    assert proc.returncode == 0 and "is finished: 4 trials" in proc.stdout, proc.stdout[-2000:]
    assert len(table_rows(tmp_path)) == 4

    proc = run_search(tmp_path, *ARGS, "--resume", "--set", "phase2.lr=0.1", timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "profile phase2.lr" in proc.stderr

    proc = run_search(tmp_path, *ARGS, "--resume", "--trials", "6", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "extending" in proc.stdout and "6/6 done" in proc.stdout
    tags = runs_of(client, "study")[0].data.tags  # no --confirm: the confirmation stays that of the earlier best
    assert tags["lpt.confirmed_trial"] == confirmed
    stale = f"confirmation: the parent run's confirm_* metrics are of trial {confirmed}, the best before"
    assert (stale in proc.stdout) == (tags["lpt.best_trial_id"] != confirmed), proc.stdout[-2000:]

    # a finished search confirms its (new) best on its own: --resume --confirm N, no extension needed
    proc = run_search(tmp_path, *ARGS, "--resume", "--confirm", "1", timeout=900)
    assert proc.returncode == 0 and "confirmation over 1 fresh seed on the test split" in proc.stdout, proc.stderr[
        -3000:
    ]
    assert "  verdict: not confirmed: " in proc.stdout  # one seed gives no interval (or the best is the baseline)
    parent = runs_of(client, "study")[0]
    assert parent.data.tags["lpt.confirmation"] == "not confirmed"
    ledger = parent.data.tags["lpt.test_exposed"].split(",")  # kept across the extension and each --confirm
    assert {confirmed, parent.data.tags["lpt.best_trial_id"]} <= set(ledger) and len(ledger) == len(set(ledger))
    assert f"the test split has seen {len(ledger)} config" in proc.stdout
    assert parent.data.tags["lpt.confirmed_trial"] == parent.data.tags["lpt.best_trial_id"]
    assert parent.info.status == "FINISHED" and len(table_rows(tmp_path)) == 6
    rows = table_rows(tmp_path)
    assert len(rows) == 6 and len({r["trial_id"] for r in rows}) == 6
    assert len(runs_of(client, "trial")) == 6 and len(runs_of(client, "study")) == 1
    record = json.loads(next((tmp_path / "runs").glob("prompt_pool-smoke-*/search.json")).read_text())
    assert record["state"] == "finished" and record["study_config"]["budget"]["trials"] == 6
    assert_study_matches_table(runs_of(client, "study")[0], rows)


def assert_study_matches_table(parent, rows: list[dict]) -> None:
    """The parent run names an Optuna study that ``optuna.load_study`` opens, with one trial per
    table row: completed ones COMPLETE, those ASHA stopped PRUNED, and one baseline."""
    tags = parent.data.tags
    study = optuna.load_study(study_name=tags["lpt.optuna_study"], storage=tags["lpt.optuna_storage"])
    states = {t.user_attrs["trial_id"]: t.state.name for t in study.trials}
    assert states == {r["trial_id"]: {"completed": "COMPLETE", "early_stopped": "PRUNED"}[r["status"]] for r in rows}
    baselines = [t.user_attrs["trial_id"] for t in study.trials if t.user_attrs.get("baseline")]
    assert baselines == [r["trial_id"] for r in rows if r["baseline"]] and len(baselines) == 1


def test_ctrl_c_during_phase1_up_front_then_resume(tmp_path):
    """Ctrl+C while the driver trains phase 1 up front: an interrupted search with the resume line;
    the phase-1 training stopped mid-way blocks nothing: --resume continues it from its last epoch."""
    args = ("--study", "prompt_pool", "--trials", "2", "--set", "phase1.epochs=40", "--set", "phase2.epochs=1")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        driver = subprocess.Popen(
            search_argv(*args), cwd=tmp_path, env=search_env(), start_new_session=True, stdout=stdout, stderr=stderr
        )
        deadline = time.time() + 300
        while time.time() < deadline and not list((tmp_path / "runs").glob("phase1-cache/*/state.safetensors")):
            assert driver.poll() is None, err.read_text()[-3000:]
            time.sleep(0.2)
        assert f"phase 1 up front: 1 config (prompt_length {SMOKE_LENGTH}), 0 cached, 1 to train" in out.read_text()
        os.killpg(driver.pid, signal.SIGINT)
        code = driver.wait(timeout=120)
    stderr_text = err.read_text()
    assert code == 130, stderr_text[-3000:]
    assert "interrupted (SIGINT): 0 of 2 trials ended" in stderr_text
    assert "continue with: python tune/search.py --study prompt_pool --profile smoke" in stderr_text
    assert_quiet(out.read_text() + stderr_text)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = runs_of(client, "study")[0]
    assert parent.info.status == "KILLED" and parent.data.tags["lpt.interrupted"] == "SIGINT"
    record = json.loads(next((tmp_path / "runs").glob("prompt_pool-smoke-*/search.json")).read_text())
    assert record["state"] == "interrupted" and not table_rows(tmp_path)

    proc = run_search(tmp_path, *args, "--resume", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at epoch" in proc.stdout and f"phase 1 prompt_length {SMOKE_LENGTH} ready" in proc.stdout
    phase1 = runs_of(client, "phase1")
    assert len(phase1) == 1 and phase1[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(phase1[0].info.run_id, "val_acc")]
    assert steps == list(range(1, 41))  # each epoch once, across the interruption
    for run in runs_of(client, "trial"):
        assert "phase1_wait_s" not in run.data.metrics  # phase 1 was ready: no wait, and no constant 0 logged


def test_a_trial_error_carries_its_own_message(tmp_path):
    """A corrupt phase-1 cache entry makes every trial raise: the real message, not a placeholder."""
    from tune.config.plan import Plan
    from tune.names import PHASE1_PROMPTS
    from tune.search import parse_args
    from tune.trial.phase1 import profile_phase1_key

    plan = Plan(parse_args(["--study", "prompt_pool", "--trials", "1", "--storage", str(tmp_path / "runs")]))
    profile = plan.profile
    key = profile_phase1_key(profile, plan.manifest_hash, profile.model.prompt_length, plan.data, profile.seed)
    entry = tmp_path / "runs" / "phase1-cache" / key
    entry.mkdir(parents=True)
    (entry / PHASE1_PROMPTS).write_bytes(b"not a safetensors file")

    proc = run_search(tmp_path, "--study", "prompt_pool", "--trials", "1", "--set", "phase2.epochs=1", timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    row = table_rows(tmp_path)[0]
    assert row["status"] == "failed" and "SafetensorError" in row["error"], row["error"]
    assert "see its error.txt" not in row["error"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(row["mlflow_run_id"])
    assert "SafetensorError" in run.data.tags["lpt.error"]
    assert f"failed {row['trial_id']}: " in proc.stdout and "SafetensorError" in proc.stdout
