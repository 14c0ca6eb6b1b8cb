"""Where a search's Optuna study lives: an SQLite file in the search folder, or the database named
by ``LPT_OPTUNA_STORAGE`` (the compose stack's PostgreSQL), one study per search.

The study outlives the driver: optuna-dashboard can watch it while the search runs, and
``optuna.load_study(study_name=..., storage=...)`` (the parent run's ``lpt.optuna_study`` and
``lpt.optuna_storage``) reloads it afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .names import OPTUNA_FILE
from .study_config import ConfigError

ENV = "LPT_OPTUNA_STORAGE"


def storage_url(folder: Path) -> str:
    """``LPT_OPTUNA_STORAGE`` when set, else ``sqlite:///<folder>/optuna.db``."""
    url = os.environ.get(ENV, "").strip()
    return url or f"sqlite:///{(Path(folder) / OPTUNA_FILE).resolve()}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The RDB storage at ``url``; a PostgreSQL database that does not exist yet is created (the
    compose stack's server holds MLflow's database, and the two must not share one: both keep an
    ``alembic_version`` table)."""
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as first:
        if url.startswith("postgresql") and _create_database(url):
            return optuna.storages.RDBStorage(url)
        raise ConfigError(f"{ENV if os.environ.get(ENV) else 'Optuna storage'} {url}: cannot open "
                          f"({type(first).__name__}: {str(first).strip().splitlines()[0]})") from None


def _create_database(url: str) -> bool:
    """``CREATE DATABASE`` for ``url``'s database through the server's ``postgres`` database."""
    import sqlalchemy
    target = sqlalchemy.engine.make_url(url)
    admin = sqlalchemy.create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                  {"n": target.database}).scalar()
            if not exists:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{target.database}"'))
        return True
    except Exception:
        return False
    finally:
        admin.dispose()


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
