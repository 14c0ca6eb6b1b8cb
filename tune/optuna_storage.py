"""Where a search's Optuna study lives: an SQLite file in the search folder, or the database named
by ``LPT_OPTUNA_STORAGE`` (the compose stack sets its PostgreSQL), one study per search.

The study outlives the driver: optuna-dashboard can watch it while the search runs, and
``optuna.load_study(study_name=..., storage=...)`` (the parent run's ``lpt.optuna_study`` and
``lpt.optuna_storage``) reloads it afterwards.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .names import OPTUNA_FILE
from .study_config import ConfigError

ENV = "LPT_OPTUNA_STORAGE"


def storage_url(folder: Path) -> str:
    """``LPT_OPTUNA_STORAGE`` when set, else ``sqlite:///<folder>/optuna.db``."""
    return os.environ.get(ENV, "").strip() or f"sqlite:///{(Path(folder) / OPTUNA_FILE).resolve()}"


def check_storage_env() -> None:
    """``LPT_OPTUNA_STORAGE``, checked before anything starts: a database URL without a password
    (the URL is recorded in MLflow, tag ``lpt.optuna_storage``)."""
    url = os.environ.get(ENV, "").strip()
    if not url:
        return
    import sqlalchemy
    try:
        password = sqlalchemy.engine.make_url(url).password
    except Exception:
        raise ConfigError(f"{ENV}={url}: not a database URL (e.g. postgresql+psycopg2://user@host:5432/db)") from None
    if password is not None:
        raise ConfigError(f"{ENV}: the URL holds a password, and the URL is recorded in MLflow "
                          f"(tag lpt.optuna_storage); give the password through PGPASSFILE instead")


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The RDB storage at ``url``. On PostgreSQL a ``search_path`` schema in the URL's options
    (``?options=-csearch_path%3Doptuna``: the compose stack keeps the studies in its MLflow
    database, apart from MLflow's tables, as both keep an ``alembic_version`` table) is created
    first if missing."""
    try:
        if url.startswith("postgresql"):
            _create_schema(url)
        return optuna.storages.RDBStorage(url)
    except Exception as exc:
        where = ENV if os.environ.get(ENV, "").strip() == url else "Optuna storage"
        raise ConfigError(f"{where} {url}: cannot open ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None


def _create_schema(url: str) -> None:
    import sqlalchemy
    options = sqlalchemy.engine.make_url(url).query.get("options", "")
    options = options if isinstance(options, str) else " ".join(options)  # a key given twice: a tuple
    found = re.search(r"search_path=([A-Za-z_][A-Za-z0-9_]*)", options)
    if not found:
        return
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{found.group(1)}"'))
    finally:
        engine.dispose()


def search_study(storage: optuna.storages.BaseStorage, name: str, modes: list[str]) -> optuna.Study:
    """The search's study, created on first use."""
    directions = ["maximize" if m == "max" else "minimize" for m in modes]
    return optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)


def fail_unfinished(study: optuna.Study) -> int:
    """Trials a killed driver left RUNNING (their Tune run is started again) become FAIL."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return len(stale)
