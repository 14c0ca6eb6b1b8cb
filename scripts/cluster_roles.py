"""The docker-compose stack's roles, made from its secret files (scripts/cluster-setup.sh). The
one-shot services run it at every ``docker compose up`` and before each ``run driver``, and
``scripts/cluster-setup.sh --rotate`` runs it after changing a secret; every run sets the passwords
to the files' again, so it can run any number of times.

    python scripts/cluster_roles.py postgres           # db-setup
    python scripts/cluster_roles.py mlflow             # mlflow-setup
    python scripts/cluster_roles.py rotate-superuser   # db-setup; stdin: the old password, the new one
    python scripts/cluster_roles.py rotate-admin       # mlflow-setup; stdin: the old password, the new one

``postgres``, as the superuser (``$LPT_SECRETS/postgres_password``) at ``$LPT_POSTGRES_ADDRESS``:
the roles mlflow, optuna and optuna_reader, each with its pgpass file's password, its CONNECTION
LIMIT (scripts/connection_budget.py, from the MLflow server's pool settings in the environment; an
``MLFLOW_WORKERS`` past the budget is refused before anything changes) and none a superuser (nor
CREATEDB, CREATEROLE, REPLICATION, BYPASSRLS); the database mlflow owned by the NOLOGIN role
mlflow_owner (no login role can drop it), CONNECT on it for the three roles only; the schema public
(MLflow's tables and its users') owned by mlflow, the schema optuna by optuna, its Optuna tables
made by optuna (so that the read-only role sees them before the first search), SELECT on them, now
and later, for optuna_reader only, whose sessions are read-only by default and whose statements
time out; CONNECT and TEMP on the databases postgres and template1 revoked from PUBLIC (only the
superuser connects there). A database made by the previous version (owned by mlflow) is migrated.

``mlflow``, as the MLflow admin (``$LPT_SECRETS/mlflow_admin_password``) at ``$MLFLOW_TRACKING_URI``,
through MLflow's auth API: the users of ``mlflow_credentials`` (searcher: the driver and every Ray
node) and ``mlflow_registrar_credentials`` (registrar: the one-shot service ``register`` only),
neither an admin, each with its file's password. The experiment ``lpt-models`` (the registered
models' runs and files) is made by the admin. searcher: EDIT on every other experiment it cannot
write yet (those made before it, or restored from a backup; MLflow itself gives it MANAGE on those
it creates), and READ only (the server's default) on ``lpt-models`` and on every registered model:
a grant it holds there, MANAGE as a model's creator included, is revoked. registrar: EDIT on every
experiment (it tags the searches' parent runs) and every registered model.
"""

from __future__ import annotations

import configparser
import os
import sys
from pathlib import Path

SUPERUSER, DATABASE, OPTUNA_SCHEMA = "postgres", "mlflow", "optuna"
OWNER = "mlflow_owner"  # NOLOGIN: owns the database, so that no login role can drop it
SYSTEM_DATABASES = ("postgres", "template1")
READER_STATEMENT_TIMEOUT = "60s"
ROLES = {"mlflow": "mlflow_pgpass", "optuna": "optuna_pgpass", "optuna_reader": "optuna_reader_pgpass"}
READER = "optuna_reader"
MLFLOW_ADMIN = "admin"
NOT_SUPER = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"


def secrets() -> Path:
    return Path(os.environ.get("LPT_SECRETS", "/run/lpt-secrets"))


def read_secret(name: str) -> str:
    return (secrets() / name).read_text().strip()


def pgpass_password(name: str, role: str) -> str:
    """The password of ``role`` in the pgpass file ``name`` (host:port:database:role:password)."""
    for line in read_secret(name).splitlines():
        fields = line.split(":")
        if len(fields) == 5 and fields[3] == role:
            return fields[4]
    raise ValueError(f"{secrets() / name}: no line for the role {role}")


def postgres_address() -> tuple[str, int]:
    host, _, port = os.environ.get("LPT_POSTGRES_ADDRESS", "postgres:5432").rpartition(":")
    return host, int(port)


def connect(user: str, password: str, database: str = DATABASE):
    import psycopg2

    host, port = postgres_address()
    return psycopg2.connect(host=host, port=port, user=user, password=password, dbname=database, connect_timeout=20)


def optuna_url(role: str) -> str:
    """The Optuna storage URL of ``role`` (no password: libpq's PGPASSFILE, or ``connect_args``)."""
    host, port = postgres_address()
    return f"postgresql+psycopg2://{role}@{host}:{port}/{DATABASE}?options=-csearch_path%3D{OPTUNA_SCHEMA}"


def setup_postgres() -> str:
    from psycopg2 import sql

    limits = connection_budget().limits(os.environ)  # refuses a worker count past the budget first
    passwords = {role: pgpass_password(secret, role) for role, secret in ROLES.items()}
    conn = connect(SUPERUSER, read_secret("postgres_password"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (OWNER,))
            if not cur.fetchone():
                cur.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(OWNER)))
            no_login = NOT_SUPER.replace("LOGIN", "NOLOGIN", 1)
            cur.execute(sql.SQL(f"ALTER ROLE {{}} WITH {no_login}").format(sql.Identifier(OWNER)))
            for role, password in passwords.items():
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                verb = "ALTER" if cur.fetchone() else "CREATE"
                cur.execute(
                    sql.SQL(f"{verb} ROLE {{}} WITH {NOT_SUPER} CONNECTION LIMIT {{}} PASSWORD %s").format(
                        sql.Identifier(role), sql.Literal(limits[role])
                    ),
                    (password,),
                )
            for statement in (
                "ALTER DATABASE {db} OWNER TO {owner}",  # the previous version's owner was mlflow
                "REVOKE ALL ON DATABASE {db} FROM PUBLIC, mlflow, optuna, optuna_reader",
                "GRANT CONNECT ON DATABASE {db} TO mlflow, optuna, optuna_reader",
                "ALTER SCHEMA public OWNER TO mlflow",  # MLflow's tables, made by mlflow
                "REVOKE ALL ON SCHEMA public FROM PUBLIC",  # PostgreSQL < 15 grants CREATE
                "GRANT USAGE ON SCHEMA public TO PUBLIC",
                "CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION optuna",
                "ALTER SCHEMA {schema} OWNER TO optuna",
                "REVOKE ALL ON SCHEMA {schema} FROM PUBLIC",
                "GRANT USAGE ON SCHEMA {schema} TO optuna_reader",
                "ALTER DEFAULT PRIVILEGES FOR ROLE optuna IN SCHEMA {schema} GRANT SELECT ON TABLES TO optuna_reader",
            ):
                cur.execute(
                    sql.SQL(statement).format(
                        db=sql.Identifier(DATABASE), schema=sql.Identifier(OPTUNA_SCHEMA), owner=sql.Identifier(OWNER)
                    )
                )
            for database in SYSTEM_DATABASES:  # only the superuser connects there (and makes TEMP tables)
                revoke = sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC")
                cur.execute(revoke.format(sql.Identifier(database)))
            reader_settings = (("default_transaction_read_only", "on"), ("statement_timeout", READER_STATEMENT_TIMEOUT))
            for setting, value in reader_settings:
                cur.execute(sql.SQL(f"ALTER ROLE {{}} SET {setting} = %s").format(sql.Identifier(READER)), (value,))
            make_optuna_tables(passwords["optuna"])
            cur.execute(
                sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO optuna_reader").format(
                    sql.Identifier(OPTUNA_SCHEMA)
                )
            )
    finally:
        conn.close()
    return (
        f"PostgreSQL: roles {', '.join(ROLES)} (none a superuser; connection limits "
        f"{', '.join(f'{r} {n}' for r, n in limits.items())}), database {DATABASE} owned by {OWNER} (no login), "
        f"schema public owned by mlflow, schema {OPTUNA_SCHEMA} by optuna, SELECT on it for {READER} (read-only)"
    )


def connection_budget():
    """scripts/connection_budget.py, next to this file (run as a script or loaded from its path)."""
    import importlib

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("connection_budget")


def make_optuna_tables(password: str) -> None:
    """Optuna's tables in the schema, made by the role optuna (their owner): what a search would
    make on its first run, and what optuna-dashboard, reading only, needs to start."""
    import optuna

    storage = optuna.storages.RDBStorage(optuna_url("optuna"), engine_kwargs={"connect_args": {"password": password}})
    storage.engine.dispose()


def rotate_superuser() -> str:
    from psycopg2 import sql

    old, new = read_two_lines()
    conn = connect(SUPERUSER, old)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("ALTER ROLE {} PASSWORD %s").format(sql.Identifier(SUPERUSER)), (new,))
    finally:
        conn.close()
    return f"PostgreSQL: the password of {SUPERUSER} changed"


def read_two_lines() -> tuple[str, str]:
    lines = sys.stdin.read().splitlines()
    if len(lines) < 2 or not lines[0] or not lines[1]:
        raise ValueError("stdin: the old password, then the new one, one a line")
    return lines[0], lines[1]


def as_mlflow_admin(password: str) -> str:
    """This process's MLflow clients log in as the admin; returns the tracking URI."""
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = MLFLOW_ADMIN, password
    return os.environ.get("MLFLOW_TRACKING_URI", "http://mlflow:5000")


def search_login(secret: str = "mlflow_credentials") -> tuple[str, str]:
    config = configparser.ConfigParser()
    config.read_string(read_secret(secret))
    return config["mlflow"]["mlflow_tracking_username"], config["mlflow"]["mlflow_tracking_password"]


MODELS_EXPERIMENT = "lpt-models"  # tune/serving/registry.py's: the registrar's alone
REGISTRAR_SECRET = "mlflow_registrar_credentials"
WRITE = ("EDIT", "MANAGE")


def mlflow_user(auth, user: str, password: str) -> str:
    """``user`` made, or given ``password``; never an admin."""
    from mlflow.exceptions import RestException

    try:
        existing = auth.get_user(user)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(user, password)
        return f"user {user} created"
    auth.update_user_password(user, password)  # the file is the truth (--rotate)
    if existing.is_admin:
        auth.update_user_admin(user, False)
    return f"user {user} (its password set)"


def read_only(auth, user: str, kind: str, resource: str) -> int:
    """``user`` down to READ on ``resource`` (the server's default): its own grant revoked; 1 if it had one."""
    from mlflow.exceptions import RestException

    if auth.get_user_permission(user, kind, resource).permission == "READ":
        return 0
    try:
        auth.revoke_user_permission(user, kind, resource)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    if auth.get_user_permission(user, kind, resource).permission != "READ":
        auth.grant_user_permission(user, kind, resource, "READ")
    return 1


def setup_mlflow() -> str:
    from mlflow import MlflowClient
    from mlflow.server.auth.client import AuthServiceClient

    user, password = search_login()
    registrar, registrar_password = search_login(REGISTRAR_SECRET)
    if registrar == user:
        raise ValueError(f"{secrets() / REGISTRAR_SECRET}: the registrar must not be the searcher ({user})")
    uri = as_mlflow_admin(read_secret("mlflow_admin_password"))
    auth = AuthServiceClient(uri)
    done = [mlflow_user(auth, user, password), mlflow_user(auth, registrar, registrar_password)]
    tracking = MlflowClient(uri)
    models_experiment = tracking.get_experiment_by_name(MODELS_EXPERIMENT)
    models_id = models_experiment.experiment_id if models_experiment else tracking.create_experiment(MODELS_EXPERIMENT)
    experiments = [e.experiment_id for e in paged(tracking.search_experiments) if e.experiment_id != "0"]
    models = [m.name for m in paged(tracking.search_registered_models)]
    # not the Default experiment: searches write their study's
    resources = [("experiment", e) for e in experiments if e != models_id]
    searcher_granted = registrar_granted = 0
    for kind, resource in resources:
        if auth.get_user_permission(user, kind, resource).permission not in WRITE:
            auth.grant_user_permission(user, kind, resource, "EDIT")
            searcher_granted += 1
    registered = [("registered_model", m) for m in models]
    revoked = sum(read_only(auth, user, kind, r) for kind, r in [("experiment", models_id), *registered])
    for kind, resource in [("experiment", e) for e in experiments] + registered:
        if auth.get_user_permission(registrar, kind, resource).permission not in WRITE:
            auth.grant_user_permission(registrar, kind, resource, "EDIT")
            registrar_granted += 1
    return (
        f"MLflow: {', '.join(done)}, not admins; {user}: EDIT granted on {searcher_granted} of {len(resources)} "
        f"experiments, READ only on {MODELS_EXPERIMENT} and {len(models)} registered models ({revoked} grants "
        f"revoked); {registrar}: EDIT granted on {registrar_granted} of {len(experiments) + len(models)} "
        f"experiments and models"
    )


def paged(search):
    token = None
    while True:
        page = search(max_results=500, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def rotate_admin() -> str:
    from mlflow.server.auth.client import AuthServiceClient

    old, new = read_two_lines()
    AuthServiceClient(as_mlflow_admin(old)).update_user_password(MLFLOW_ADMIN, new, current_password=old)
    return f"MLflow: the password of {MLFLOW_ADMIN} changed"


COMMANDS = {
    "postgres": setup_postgres,
    "mlflow": setup_mlflow,
    "rotate-superuser": rotate_superuser,
    "rotate-admin": rotate_admin,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(COMMANDS[argv[0]](), flush=True)
    except Exception as exc:  # one line for the set-up's log; the services that depend on it do not start
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        print(f"error: cluster_roles.py {argv[0]}: {type(exc).__name__}: {lines[0] if lines else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
