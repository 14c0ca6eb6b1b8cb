"""One driver per search (tune/engine/search_lock.py): a second driver of a running search is refused with
one line before Ray starts, and a killed driver leaves no lock behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from tune.config.plan import Plan
from tune.engine.search_lock import SearchLock, SearchRunning
from tune.record import SearchRecord, save_record
from tune.search import main, parse_args

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time; from pathlib import Path; from tune.engine.search_lock import SearchLock; "
    "SearchLock().take(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)"
)


def hold(folder: Path) -> subprocess.Popen:
    """Another process (a driver) holding the folder's lock."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_driver_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    holder = hold(tmp_path)
    try:
        with pytest.raises(
            SearchRunning,
            match=rf"^--resume: {tmp_path.name} is running \(pid {holder.pid} on "
            rf"\S+ since [\d-]+ [\d:]+\): a search runs in one driver at a time",
        ):
            SearchLock().take(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    with SearchLock() as lock:
        lock.take(tmp_path)
        assert (tmp_path / "search.lock").read_text().startswith(f"pid {os.getpid()} on ")
    SearchLock().take(tmp_path)  # released on exit


def test_a_resume_of_a_running_search_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    argv = ["--study", "prompt_pool", "--trials", "3", "--storage", str(tmp_path / "runs"), "--resume"]
    plan = Plan(parse_args(argv))
    folder = (plan.storage / "prompt_pool-smoke-20260101-000000").local_path  # as the running driver wrote it
    folder.mkdir(parents=True)
    save_record(
        folder,
        SearchRecord.model_validate(
            {
                "name": folder.name,
                "manifest_hash": plan.manifest_hash,
                "profile": plan.profile,
                "study_config": plan.study,
                "state": "running",
            }
        ),
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    holder = hold(folder)
    try:
        code = main(argv)
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: --resume: {folder.name} is running (pid {holder.pid} on "), err
    assert len(err.splitlines()) == 1 and not ray.is_initialized()
