"""The searches' Optuna storage on a database server that restarts (tune/engine/optuna_storage.py), as the
compose stack's PostgreSQL does under a running search: the storage pings its pooled connections
and tries again the calls made while the server is away, so no trial is lost; an error the server
answers with (a wrong password) is not waited out. A server or role with no connection slot free
("too many clients", SQLSTATE 53300) is waited for too, and past the window the storage fails with
one line.

Slow (a throwaway PostgreSQL); skips with the reason where its server binaries are missing.
"""

import logging
import os
import threading
import time

import optuna
import pytest
import sqlalchemy
from cluster_fixtures import Postgres, postgres_unavailable
from optuna.trial import TrialState

from tune.engine import database, optuna_storage
from tune.engine.optuna_storage import DatabaseUnavailable, RetryingRDBStorage, open_storage, search_study, unreachable
from tune.engine.search_lock import SearchLock
from tune.errors import ServiceError

pytestmark = pytest.mark.slow


@pytest.fixture
def postgres(tmp_path, monkeypatch):
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    server = Postgres("storage-test-password").start()
    pgpass = tmp_path / "pgpass"  # libpq reads the password: the URL (recorded in MLflow) holds none
    pgpass.write_text(f"*:*:*:postgres:{server.password}")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    yield server
    server.stop()


def url_of(server: Postgres) -> str:
    return f"postgresql+psycopg2://postgres@127.0.0.1:{server.port}/mlflow?options=-csearch_path%3Doptuna"


def test_the_storage_waits_out_a_postgresql_restart(postgres, caplog):
    storage = open_storage(url_of(postgres))
    assert isinstance(storage, RetryingRDBStorage) and storage.engine_kwargs == {
        "pool_pre_ping": True,
        "pool_size": 2,
        "max_overflow": 3,
        "connect_args": database.CONNECT_ARGS,
    }
    assert (storage.engine.pool.size(), storage.engine.pool._max_overflow) == (2, 3)
    study = search_study(storage, "restart", ["max"])
    first = study.ask({"x": optuna.distributions.IntDistribution(0, 9)})
    study.tell(first, 1.0)

    postgres.stop_server("fast")  # as `docker restart` stops it
    restart = threading.Timer(3.0, postgres.start_server)
    restart.start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=optuna_storage.__name__):
        trial = study.ask({"x": optuna.distributions.IntDistribution(0, 9)})  # made while the server is down
        trial.report(0.5, 1)
        trial.set_user_attr("trial_id", "t2")
        study.tell(trial, 2.0)
    restart.join()
    assert time.monotonic() - started >= 2.5  # the first call waited for the server
    assert any("the database is unreachable" in r.getMessage() for r in caplog.records)

    again = optuna.load_study(study_name="restart", storage=open_storage(url_of(postgres)))
    assert [(t.state, t.value) for t in again.trials] == [(TrialState.COMPLETE, 1.0), (TrialState.COMPLETE, 2.0)]
    assert again.trials[1].intermediate_values == {1: 0.5} and again.trials[1].user_attrs == {"trial_id": "t2"}


def test_an_error_the_server_answers_is_not_waited_out(postgres, monkeypatch):
    monkeypatch.setattr(database, "WAIT_FOR_DATABASE_S", 60)
    engine = sqlalchemy.create_engine(url_of(postgres).replace("postgres@", "postgres:wrong@"))
    with pytest.raises(sqlalchemy.exc.OperationalError) as refused:
        engine.connect()
    assert not unreachable(refused.value)  # "FATAL: password authentication failed"
    storage = open_storage(url_of(postgres))
    with pytest.raises(Exception) as missing:
        storage.get_study_id_from_name("no-such-study")
    assert not unreachable(missing.value)
    postgres.stop_server("fast")
    with pytest.raises(sqlalchemy.exc.OperationalError) as down:
        engine.connect()
    assert unreachable(down.value)  # "Connection refused"


def test_a_full_database_is_waited_for_then_one_line(postgres, monkeypatch, caplog, tmp_path):
    """A role whose CONNECTION LIMIT (2: Optuna opens its storage on two connections) is taken:
    opening the storage, and a call on a storage whose pool was dropped, wait until the slots free
    and succeed; with the slots kept past the window, opening, a call and the search lock each fail
    with one line naming the limit."""
    import psycopg2

    with postgres.connect() as conn, conn.cursor() as cur:
        conn.autocommit = True
        cur.execute("CREATE ROLE crowded LOGIN PASSWORD 'crowded-pw' CONNECTION LIMIT 2")
        cur.execute("CREATE SCHEMA optuna AUTHORIZATION crowded")
        cur.execute("GRANT CONNECT ON DATABASE mlflow TO crowded")
    pgpass = os.environ["PGPASSFILE"]
    with open(pgpass, "a") as f:
        f.write("\n*:*:*:crowded:crowded-pw\n")
    url = url_of(postgres).replace("postgres@", "crowded@")
    monkeypatch.setattr(database, "WAIT_FOR_DATABASE_S", 60)

    class hold_the_slots:  # the role's two connections, held until closed
        def __init__(self):
            self.conns = [
                psycopg2.connect(host="127.0.0.1", port=postgres.port, user="crowded", dbname="mlflow", passfile=pgpass)
                for _ in range(2)
            ]

        def close(self):
            for conn in self.conns:
                conn.close()

    held = hold_the_slots()
    release = threading.Timer(3.0, held.close)
    release.start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=database.__name__):
        storage = open_storage(url)
    release.join()
    assert time.monotonic() - started >= 2.5
    assert any('too many connections for role "crowded"' in r.getMessage() for r in caplog.records)
    study = search_study(storage, "crowded", ["max"])

    storage.engine.dispose()  # its pooled connection closes: the next call needs the slot again
    held = hold_the_slots()
    release = threading.Timer(2.0, held.close)
    release.start()
    started = time.monotonic()
    assert [s.study_name for s in storage.get_all_studies()] == ["crowded"]
    release.join()
    assert time.monotonic() - started >= 1.5
    storage.engine.dispose()

    monkeypatch.setattr(database, "WAIT_FOR_DATABASE_S", 2)
    held = hold_the_slots()
    try:
        with pytest.raises(DatabaseUnavailable) as full:
            open_storage(url)
        with pytest.raises(DatabaseUnavailable) as call_full:
            study.trials  # noqa: B018 -- a storage call
        monkeypatch.setenv("LPT_OPTUNA_STORAGE", url)  # the search lock's connection waits the same way
        with pytest.raises(ServiceError, match=r"^LPT_OPTUNA_STORAGE: cannot take the search's lock \(Database"):
            SearchLock().take(tmp_path / "crowded-search")
    finally:
        held.close()
    line = str(full.value)
    assert "\n" not in line and line.startswith(f"Optuna storage {url}: cannot open (open the Optuna storage: ")
    assert 'stayed unreachable or full for 2 s (OperationalError: connection to server at "127.0.0.1"' in line
    assert line.endswith('failed: FATAL: too many connections for role "crowded"))')
    assert str(call_full.value).startswith("_get_trials: the database stayed unreachable or full for ")
    assert str(call_full.value).endswith('FATAL: too many connections for role "crowded")')
