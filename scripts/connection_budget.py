"""The compose stack's PostgreSQL connection budget: every pool that can connect, per role, against
the server's ``max_connections``. db-setup (scripts/cluster_roles.py) sets each role's CONNECTION
LIMIT from ``limits()`` and refuses an ``MLFLOW_WORKERS`` above ``MLFLOW_WORKERS_MAX`` (then the
MLflow server does not start); docs/cluster.md shows the table; tests/test_compose.py recomputes it
from docker-compose.yml's settings.

PostgreSQL keeps its default ``max_connections`` (100), of which ``superuser_reserved_connections``
(3) only the superuser may use: 97 for the roles. SQLAlchemy's pool holds at most pool_size +
max_overflow connections per engine.
"""

from __future__ import annotations

from collections.abc import Mapping

MAX_CONNECTIONS = 100  # PostgreSQL's default; the postgres service keeps it
SUPERUSER_RESERVED = 3  # superuser_reserved_connections' default
SUPERUSER_ROOM = 10  # left for the superuser beyond its reserve: db-setup, pg_dump, psql

# MLflow server (role mlflow): each worker process opens one SQLAlchemy engine per store it uses,
# each with MLFLOW_SQLALCHEMYSTORE_POOL_SIZE + MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW connections
# (mlflow/store/db/utils.py: create_sqlalchemy_engine); the server's parent process keeps the
# auth store its start-up check opened (mlflow server's _bootstrap_basic_auth).
MLFLOW_WORKERS_MAX = 4
MLFLOW_ENGINES = ("tracking", "model registry", "auth", "jobs")
MLFLOW_PARENT = 1 * 1  # one auth engine, one connection left in it
# the searches' drivers (role optuna): the Optuna storage's pool (tune/engine/optuna_storage.py)
# and the search lock's connection (tune/engine/search_lock.py); db-setup makes the tables as optuna
DRIVERS_MAX = 2
OPTUNA_POOL = (2, 3)  # POOL_SIZE, MAX_OVERFLOW of tune/engine/optuna_storage.py
SEARCH_LOCK = 1
OPTUNA_SETUP = 1
# optuna-dashboard (role optuna_reader): its CLI takes no pool settings (Optuna's default pool,
# 5 + 10); the role's limit caps it, a request past the limit fails and the page's next poll retries
READER_LIMIT = 5

DEFAULT_POOL = (5, 10)  # SQLAlchemy's, when MLflow's settings are unset


class BudgetError(ValueError):
    """A setting past the budget: the message is one line naming it."""


def mlflow_pool(env: Mapping[str, str]) -> tuple[int, int]:
    """The MLflow server's pool_size and max_overflow per engine, from its environment."""
    size = env.get("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE") or DEFAULT_POOL[0]
    overflow = env.get("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW") or DEFAULT_POOL[1]
    return int(size), int(overflow)


def mlflow_workers(env: Mapping[str, str]) -> int:
    """``MLFLOW_WORKERS`` (2 when unset), refused outside 1..``MLFLOW_WORKERS_MAX``."""
    value = str(env.get("MLFLOW_WORKERS") or "2").strip()
    if not value.isdigit() or not 1 <= int(value) <= MLFLOW_WORKERS_MAX:
        raise BudgetError(
            f"MLFLOW_WORKERS={value}: must be 1 to {MLFLOW_WORKERS_MAX}, the PostgreSQL connection budget "
            f"(docs/cluster.md, 'Connection budget')"
        )
    return int(value)


def rows(env: Mapping[str, str]) -> list[tuple[str, str, int]]:
    """(role, what connects as it: pools x (size + overflow), CONNECTION LIMIT), worst cases."""
    size, overflow = mlflow_pool(env)
    per_driver = sum(OPTUNA_POOL) + SEARCH_LOCK
    engines = len(MLFLOW_ENGINES)
    return [
        (
            "mlflow",
            f"MLflow server: {MLFLOW_WORKERS_MAX} workers x {engines} engines x ({size} + {overflow})"
            f" + parent {MLFLOW_PARENT}",
            MLFLOW_WORKERS_MAX * engines * (size + overflow) + MLFLOW_PARENT,
        ),
        (
            "optuna",
            f"drivers: {DRIVERS_MAX} x (storage {OPTUNA_POOL[0]} + {OPTUNA_POOL[1]} + lock {SEARCH_LOCK})"
            f" + db-setup {OPTUNA_SETUP}",
            DRIVERS_MAX * per_driver + OPTUNA_SETUP,
        ),
        ("optuna_reader", f"optuna-dashboard: 1 x (5 + 10), capped at {READER_LIMIT}", READER_LIMIT),
    ]


def limits(env: Mapping[str, str]) -> dict[str, int]:
    """Each role's CONNECTION LIMIT; refused when their sum leaves the superuser too little."""
    mlflow_workers(env)
    found = {role: limit for role, _, limit in rows(env)}
    room = MAX_CONNECTIONS - SUPERUSER_RESERVED - SUPERUSER_ROOM
    if sum(found.values()) > room:
        raise BudgetError(
            f"PostgreSQL connection budget: the roles' worst case {sum(found.values())} > {room} "
            f"(max_connections {MAX_CONNECTIONS} - reserved {SUPERUSER_RESERVED} - set-up {SUPERUSER_ROOM}); "
            f"lower MLFLOW_SQLALCHEMYSTORE_POOL_SIZE / _MAX_OVERFLOW"
        )
    return found
