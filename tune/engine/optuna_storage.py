"""Where a search's Optuna study lives: an SQLite file in the search folder, or the database named
by ``LPT_OPTUNA_STORAGE`` (the compose stack sets its PostgreSQL), one study per search.

The study outlives the driver: optuna-dashboard can watch it while the search runs, and
``optuna.load_study(study_name=..., storage=...)`` (the parent run's ``lpt.optuna_study`` and
``lpt.optuna_storage``) reloads it afterwards.

A database server may restart under a running search (the compose stack's PostgreSQL): the
storage pings a pooled connection before using it, and a call that fails because the server cannot
be reached is tried again for up to ``WAIT_FOR_DATABASE_S`` (``RetryingRDBStorage``).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune import Callback

from tune.config.checks import OPTUNA_STORAGE_ENV
from tune.errors import ConfigError
from tune.names import OPTUNA_FILE
from tune.storage import Location, location, work_dir

WAIT_FOR_DATABASE_S = 300  # how long a storage call waits for an unreachable database to come back
logger = logging.getLogger(__name__)


def storage_url(folder: Location | Path) -> str:
    """``LPT_OPTUNA_STORAGE`` when set, else an SQLite file: ``<folder>/optuna.db`` in a local
    search folder; for a folder on object storage (no file locking there), a working copy on the
    driver (``tune.storage.work_dir``) that ``publish_copy`` publishes into the folder."""
    return os.environ.get(OPTUNA_STORAGE_ENV, "").strip() or f"sqlite:///{sqlite_file(location(folder))}"


def sqlite_file(folder: Location) -> Path:
    if folder.is_local:
        return folder.local_path / OPTUNA_FILE
    work = work_dir(folder.name)
    work.mkdir(parents=True, exist_ok=True)
    return work / OPTUNA_FILE


def publish_copy(folder: Location, url: str) -> None:
    """A search on object storage with an SQLite study: publish a consistent copy of the study
    (SQLite's backup) as ``<folder>/optuna.db``, so ``--resume`` works from another machine."""
    folder = location(folder)
    if folder.is_local or not url.startswith("sqlite"):
        return
    import sqlite3
    import tempfile

    source = sqlite_file(folder)
    if not source.is_file():
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / OPTUNA_FILE
        src, dst = sqlite3.connect(source), sqlite3.connect(copy)
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        (folder / OPTUNA_FILE).upload(copy)


def fetch_copy(folder: Location, record: dict) -> None:
    """Before a search on object storage resumes with an SQLite study: this machine's working copy
    (the published one when this machine has none), and the record's URL pointing at it."""
    folder = location(folder)
    if folder.is_local or not record.get("optuna_storage", "").startswith("sqlite"):
        return
    local = sqlite_file(folder)
    if not local.is_file() and (folder / OPTUNA_FILE).is_file():
        (folder / OPTUNA_FILE).download(local)
    record["optuna_storage"] = storage_url(folder)


class PublishCopy(Callback):
    """A Tune callback that publishes the SQLite copy as trials end."""

    def __init__(self, folder: Location, url: str):
        self.folder, self.url = location(folder), url

    def on_trial_complete(self, *args, **kwargs) -> None:
        publish_copy(self.folder, self.url)

    on_trial_error = on_trial_complete


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The RDB storage at ``url``. On a database server (not SQLite) it pre-pings pooled
    connections and waits out a restart (``RetryingRDBStorage``); on PostgreSQL a ``search_path``
    schema in the URL's options (``?options=-csearch_path%3Doptuna``: the compose stack keeps the
    studies in its MLflow database, apart from MLflow's tables, as both keep an ``alembic_version``
    table) is created first if missing."""
    try:
        if url.startswith("sqlite"):
            return optuna.storages.RDBStorage(url)
        if url.startswith("postgresql"):
            _create_schema(url)
        return RetryingRDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:
        where = OPTUNA_STORAGE_ENV if os.environ.get(OPTUNA_STORAGE_ENV, "").strip() == url else "Optuna storage"
        raise ConfigError(
            f"{where} {url}: cannot open ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
        ) from None


def _create_schema(url: str) -> None:
    import sqlalchemy

    options = sqlalchemy.engine.make_url(url).query.get("options", "")
    options = options if isinstance(options, str) else " ".join(options)  # a key given twice: a tuple
    found = re.search(r"search_path=([A-Za-z_][A-Za-z0-9_]*)", options)
    if not found:
        return
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:  # a role without CREATE on the database uses the schema made for it
            query = sqlalchemy.text("SELECT 1 FROM pg_namespace WHERE nspname = :name")
            if conn.execute(query, {"name": found.group(1)}).first() is None:
                conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{found.group(1)}"'))
    finally:
        engine.dispose()


def unreachable(exc: BaseException) -> bool:
    """The database could not be reached or dropped the connection (a restart), as opposed to an
    error it answered with (a wrong password, a missing table): an error of a live connection
    carries a SQLSTATE, where only class 08 (connection exception) and 57P (shutting down,
    starting up) say that the server goes away; a refused connection carries none, and its
    message holds the server's FATAL line unless the server was not there to answer."""
    import sqlalchemy.exc

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlalchemy.exc.DBAPIError):
            if exc.connection_invalidated:
                return True
            if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
                code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
                if code:
                    return code.startswith(("08", "57P"))
                return not _ANSWERED.search(str(exc.orig))
        exc = exc.__cause__ or exc.__context__
    return False


_ANSWERED = re.compile(r"FATAL:\s+(?!the database system is)")  # e.g. "password authentication failed"
_calling = threading.local()  # a retried call's inner storage calls are not retried again


def _waits_for_database(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if getattr(_calling, "depth", 0):
            return method(self, *args, **kwargs)
        _calling.depth = 1
        try:
            deadline, pause = time.monotonic() + WAIT_FOR_DATABASE_S, 0.5
            while True:
                try:
                    return method(self, *args, **kwargs)
                except Exception as exc:
                    if not unreachable(exc) or time.monotonic() + pause > deadline:
                        raise
                    logger.warning(
                        "Optuna storage: the database is unreachable (%s); %s again in %.1f s",
                        type(exc).__name__,
                        method.__name__,
                        pause,
                    )
                    time.sleep(pause)
                    pause = min(pause * 2, 10.0)
        finally:
            _calling.depth = 0

    return call


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose calls wait out a database server that restarts: a call that fails
    because the server cannot be reached is tried again, on a new connection, for up to
    ``WAIT_FOR_DATABASE_S`` seconds. Every call the searcher, the study and Optuna's cache make
    goes through one of the methods wrapped below."""


for _name in sorted(
    {n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_")}
    | {"_create_new_trial", "_get_trials", "_set_trial_param", "_get_best_trial_id", "_get_stale_trial_ids"}
):
    if callable(getattr(optuna.storages.RDBStorage, _name, None)):
        setattr(RetryingRDBStorage, _name, _waits_for_database(getattr(optuna.storages.RDBStorage, _name)))


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
