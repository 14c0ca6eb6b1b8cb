"""One whole smoke search, run once per test session and shared by the slow tests that inspect it.

``tests/conftest.py``'s session fixture ``smoke_search`` runs ``tune/search.py --study prompt_pool
--trials 6 --register`` (the smoke profile: a tiny random ViT on synthetic data, phase 2 for 4 epochs) in a
folder of its own, as a user would: ``./mlflow.db``, ``./mlartifacts/`` and ``./runs/`` beside each
other. Tests read it and never change it; a test that writes (a second search, a rebuilt report)
works on ``copy_to(...)``, a copy whose MLflow store points at the copy's own files.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEARCH = ROOT / "tune" / "search.py"
STUDY = "prompt_pool"
TRIALS = 6  # enough trials for ASHA to stop one early while another runs every epoch
ARGS = ("--study", STUDY, "--trials", str(TRIALS), "--register")  # --register: the best trial's model too
TIMEOUT_S = 900


def search_env(**extra) -> dict:
    """The environment of a search started from a shell with no cluster, tracking server or storage set."""
    unset = ("RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "LPT_STORAGE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", **extra)
    return env


@dataclass(frozen=True)
class SmokeSearch:
    cwd: Path  # where the search ran
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def db(self) -> Path:
        return self.cwd / "mlflow.db"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.db}"

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    @property
    def folder(self) -> Path:
        """The one search folder (``runs/prompt_pool-smoke-<time>``)."""
        folders = [p for p in (self.cwd / "runs").iterdir() if (p / "search.json").exists()]
        assert len(folders) == 1, folders
        return folders[0]

    def copy_to(self, dst: Path) -> SmokeSearch:
        """A copy of the search under ``dst`` (made if missing) to change freely.

        MLflow and the search record hold absolute paths (the experiment's and runs' artifact
        locations, the parent run's ``lpt.storage`` tag, ``search.json``'s tracking URI): they are
        rewritten to the copy, so nothing done there reaches the shared search.
        """
        old, new = str(self.cwd.resolve()), str(Path(dst).resolve())
        shutil.copytree(self.cwd, new, symlinks=True, dirs_exist_ok=True)
        with sqlite3.connect(Path(new) / "mlflow.db") as con:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                    if any(t in kind.upper() for t in ("CHAR", "TEXT", "CLOB")):
                        con.execute(
                            f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                            f'WHERE instr("{column}", ?) > 0',
                            (old, new, old),
                        )
        con.close()
        for record in Path(new, "runs").glob("*/search.json"):
            record.write_text(record.read_text().replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1]))
        return SmokeSearch(Path(new), self.args, self.returncode, self.stdout, self.stderr)


def search_argv(*args: str) -> list[str]:
    return [sys.executable, str(SEARCH), *args]


def run_search(cwd: Path, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """``tune/search.py *args`` in ``cwd`` with ``search_env()``, output captured."""
    return subprocess.run(
        search_argv(*args), cwd=cwd, env=search_env(), capture_output=True, text=True, timeout=timeout
    )


def runs_of(client, role: str, experiment: str = STUDY) -> list:
    """The runs of an experiment with ``lpt.role`` = ``role`` (study, phase1, trial)."""
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`lpt.role` = '{role}'", max_results=500)


def run_smoke_search(cwd: Path) -> SmokeSearch:
    """``tune/search.py`` with ``ARGS`` in ``cwd``; its exit status and output, checked by the tests."""
    proc = run_search(cwd, *ARGS)
    return SmokeSearch(Path(cwd).resolve(), ARGS, proc.returncode, proc.stdout, proc.stderr)
