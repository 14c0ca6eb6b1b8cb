"""Where a search's Optuna study lives: an SQLite file in the search folder, or the database named
by ``LPT_OPTUNA_STORAGE`` (the compose stack sets its PostgreSQL), one study per search.

The study outlives the driver: optuna-dashboard can watch it while the search runs, and
``optuna.load_study(study_name=..., storage=...)`` (the parent run's ``lpt.optuna_study`` and
``lpt.optuna_storage``) reloads it afterwards.

A database server may restart or be full under a running search (the compose stack's PostgreSQL):
the storage pings a pooled connection before using it, its connections time out and keep alive
(``tune.engine.database.CONNECT_ARGS``), and opening it or a call that fails because the server
cannot be reached or has no connection slot free is tried again for up to
``tune.engine.database.WAIT_FOR_DATABASE_S`` (``RetryingRDBStorage``). Its pool is small
(``POOL_SIZE`` + ``MAX_OVERFLOW``): the stack's connection budget (docs/cluster.md) counts it.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from pathlib import Path

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState
from ray.tune import Callback

from tune.config.checks import OPTUNA_STORAGE_ENV
from tune.engine.database import CONNECT_ARGS, DatabaseUnavailable, waiting
from tune.engine.database import unreachable as unreachable  # known from here too
from tune.errors import ConfigError
from tune.names import OPTUNA_FILE
from tune.record import SearchRecord
from tune.storage import Location, location, work_dir

POOL_SIZE, MAX_OVERFLOW = 2, 3  # at most 5 connections per driver (scripts/connection_budget.py)


def engine_kwargs(url: str) -> dict:
    """The storage's pool, and on PostgreSQL libpq's connect timeout and keepalives."""
    kwargs: dict = {"pool_pre_ping": True, "pool_size": POOL_SIZE, "max_overflow": MAX_OVERFLOW}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = dict(CONNECT_ARGS)
    return kwargs


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


def fetch_copy(folder: Location, record: SearchRecord) -> None:
    """Before a search on object storage resumes with an SQLite study: this machine's working copy
    (the published one when this machine has none), and the record's URL pointing at it."""
    folder = location(folder)
    if folder.is_local or not record.optuna_storage.startswith("sqlite"):
        return
    local = sqlite_file(folder)
    if not local.is_file() and (folder / OPTUNA_FILE).is_file():
        (folder / OPTUNA_FILE).download(local)
    record.optuna_storage = storage_url(folder)


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

        def opened() -> RetryingRDBStorage:
            if url.startswith("postgresql"):
                _create_schema(url)
            return RetryingRDBStorage(url, engine_kwargs=engine_kwargs(url))

        _calling.depth = 1  # the storage's own calls while it opens are not waited out twice
        try:
            return waiting(opened, "open the Optuna storage")
        finally:
            _calling.depth = 0
    except Exception as exc:
        where = OPTUNA_STORAGE_ENV if os.environ.get(OPTUNA_STORAGE_ENV, "").strip() == url else "Optuna storage"
        if isinstance(exc, DatabaseUnavailable):
            raise DatabaseUnavailable(f"{where} {url}: cannot open ({exc})") from None
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
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=CONNECT_ARGS)
    try:
        with engine.begin() as conn:  # a role without CREATE on the database uses the schema made for it
            query = sqlalchemy.text("SELECT 1 FROM pg_namespace WHERE nspname = :name")
            if conn.execute(query, {"name": found.group(1)}).first() is None:
                conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{found.group(1)}"'))
    finally:
        engine.dispose()


_calling = threading.local()  # a retried call's inner storage calls are not retried again


def _waits_for_database(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if getattr(_calling, "depth", 0):
            return method(self, *args, **kwargs)
        _calling.depth = 1
        try:
            return waiting(lambda: method(self, *args, **kwargs), method.__name__)
        finally:
            _calling.depth = 0

    return call


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose calls wait out a database server that restarts or is full: a call that
    fails because the server cannot be reached or has no slot free is tried again, on a new
    connection, for up to ``tune.engine.database.WAIT_FOR_DATABASE_S`` seconds. Every call the
    searcher, the study and Optuna's cache make goes through one of the methods wrapped below."""

    def __init__(self, *args, **kwargs):
        try:
            super().__init__(*args, **kwargs)
        except Exception:  # a failed open gives its pooled connections back, so that a retry finds a slot
            if getattr(self, "scoped_session", None) is not None:
                self.scoped_session.remove()
            if getattr(self, "engine", None) is not None:
                self.engine.dispose()
            raise


for _name in sorted(
    {n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_")}
    | {"_create_new_trial", "_get_trials", "_set_trial_param", "_get_best_trial_id", "_get_stale_trial_ids"}
):
    if callable(getattr(optuna.storages.RDBStorage, _name, None)):
        setattr(RetryingRDBStorage, _name, _waits_for_database(getattr(optuna.storages.RDBStorage, _name)))


def search_study(storage: optuna.storages.BaseStorage, name: str, modes: list[str]) -> optuna.Study:
    """The search's study, created on first use."""
    directions = [StudyDirection.MAXIMIZE if m == "max" else StudyDirection.MINIMIZE for m in modes]
    return optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)


def requeue_unknown(study: optuna.Study, known: frozenset[int]) -> int:
    """After ``Tuner.restore``: the trials RUNNING in the study that the restored searcher does not
    know (``known``: Optuna's trial ids) were asked for after Tune's last snapshot, and no Tune
    run will run them. They go back to WAITING: the next trials the restored run asks for take
    them, with the parameters they were sampled with (Optuna keeps a parameter once suggested),
    so the study ends holding the trials trials.parquet holds. Returns how many."""
    return _set_running(study, TrialState.WAITING, keep=known)


def fail_unfinished(study: optuna.Study) -> int:
    """Trials a killed driver left RUNNING (their Tune run is started again) become FAIL."""
    return _set_running(study, TrialState.FAIL)


def _set_running(study: optuna.Study, state: TrialState, keep: frozenset[int] = frozenset()) -> int:
    """Every RUNNING trial of the study but those in ``keep`` set to ``state``; how many."""
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t._trial_id not in keep]
    for trial in running:
        study._storage.set_trial_state_values(trial._trial_id, state)
    return len(running)
