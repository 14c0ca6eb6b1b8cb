"""The searches' Optuna storage on a database server that restarts (tune/engine/optuna_storage.py), as the
compose stack's PostgreSQL does under a running search: the storage pings its pooled connections
and tries again the calls made while the server is away, so no trial is lost; an error the server
answers with (a wrong password) is not waited out.

Slow (a throwaway PostgreSQL); skips with the reason where its server binaries are missing.
"""

import logging
import threading
import time

import optuna
import pytest
import sqlalchemy
from cluster_fixtures import Postgres, postgres_unavailable
from optuna.trial import TrialState

from tune.engine import optuna_storage
from tune.engine.optuna_storage import RetryingRDBStorage, open_storage, search_study, unreachable

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
    assert isinstance(storage, RetryingRDBStorage) and storage.engine_kwargs == {"pool_pre_ping": True}
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
    monkeypatch.setattr(optuna_storage, "WAIT_FOR_DATABASE_S", 60)
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
