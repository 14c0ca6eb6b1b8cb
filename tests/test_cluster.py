"""docker-compose.yml's stack without Docker: the commands its services run, started as local
processes on loopback (see cluster_fixtures.py) -- a Ray head without CPUs and two Ray worker nodes,
with token authentication on; PostgreSQL with the db-setup service's roles, the MLflow server on it
and the mlflow-setup service's user; and the driver service's search command. The searches must
spread over both workers, land in that MLflow server, and survive the loss of a worker node; each
service's database role and MLflow user may do its job and nothing more; the read-only
optuna-dashboard deletes nothing; the set-up's rotations change passwords in place.

Slow (a few minutes on two cores). Needs PostgreSQL's server binaries and psycopg2 in the venv;
skips with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from cluster_fixtures import (
    DASHBOARD_TOKEN_EXPECTED,
    LOOPBACK,
    MLFLOW_LOGIN_EXPECTED,
    ROOT,
    VENV_BIN,
    LocalStack,
    Proc,
    basic_auth,
    command_of,
    dashboard_token_statuses,
    free_port,
    http_status,
    localize,
    login_to_mlflow,
    mlflow_login,
    mlflow_login_statuses,
    postgres_unavailable,
    wait_http,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # every wait inside has its own limit too

SEARCH_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    for tool in ("ray", "mlflow"):
        if not (VENV_BIN / tool).exists():
            pytest.skip(f"`{tool}` is not installed next to {sys.executable}")
    stack = LocalStack(tmp_path_factory.mktemp("cluster"))
    login = login_to_mlflow(stack.secrets)  # this process reads the MLflow server as the driver does
    try:
        started = time.time()
        stack.start_postgres()
        stack.start_mlflow()  # migrates the database while Ray starts
        stack.start_head()
        stack.add_workers(2)
        stack.wait_mlflow()
        nodes = stack.nodes(expect_alive=3)
        stack.head_id = next(n["node_id"] for n in nodes if n["head"])
        stack.worker_ids = [next(n["node_id"] for n in nodes if n["port"] == port) for port in stack.worker_ports]
        print(
            f"stack up in {time.time() - started:.0f} s: head {stack.head_id[:12]}, "
            f"workers {[w[:12] for w in stack.worker_ids]}, MLflow {stack.tracking_uri}"
        )
        yield stack
    finally:
        stack.stop()
        login.undo()


def client_for(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.tracking_uri)


def new_search_folder(stack, prefix: str, before: set) -> Path:
    found = [
        p for p in (stack.shared / "runs").glob(f"{prefix}-*") if p not in before and (p / "search.json").is_file()
    ]
    assert len(found) == 1, f"expected one new search folder {prefix}-*, found {found}"
    return found[0]


def searches(stack, prefix: str) -> set:
    return set((stack.shared / "runs").glob(f"{prefix}-*"))


def start_search(stack, tmp_path: Path, *args: str, flags: dict | None = None) -> Proc:
    argv = stack.driver_argv(*args, flags=flags)
    assert argv[1] == str(ROOT / "tune" / "search.py") and f"{stack.shared}/runs" in argv, argv
    return Proc("search driver", argv, stack.service_env("driver"), tmp_path / "driver.log", cwd=tmp_path)


def finish(proc: Proc, timeout_s: float = SEARCH_TIMEOUT_S) -> None:
    try:
        proc.popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.stop()
        pytest.fail(f"the search did not finish within {timeout_s} s:\n{proc.tail(6000)}")
    assert proc.popen.returncode == 0, f"the search failed ({proc.popen.returncode}):\n{proc.tail(6000)}"


def trial_runs(client, record: dict):
    return client.search_runs(
        [record["experiment_id"]],
        f"tags.`mlflow.parentRunId` = '{record['parent_run_id']}' and tags.`lpt.role` = 'trial'",
        max_results=200,
    )


def test_the_cluster_refuses_a_client_without_the_token(stack):
    """A Ray client with a wrong token, or one that does not use token auth at all, is refused;
    so is the compose file's health check of the head (`ray health-check`) without the token."""
    code = (
        "import sys\nfrom ray._raylet import GcsClient\n"
        "GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)\nprint('LISTED')"
    )
    right = stack.service_env("driver")
    wrong_token = stack.workdir / "wrong_token"
    wrong_token.write_text("not-the-token")
    wrong = {**right, "RAY_AUTH_TOKEN_PATH": str(wrong_token)}
    # no auth configured at all; HOME without ~/.ray/auth_token to fall back on
    none = {k: v for k, v in right.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    none["HOME"] = str(stack.workdir)
    list_nodes = [sys.executable, "-c", code, stack.ray_address]
    health = [str(VENV_BIN / "ray"), "health-check", "--address", stack.ray_address]
    checks = {
        "client, wrong token": (list_nodes, wrong, False),
        "client, no auth": (list_nodes, none, False),
        "health-check": (health, stack.service_env("ray-head"), True),
        "health-check, wrong token": (
            health,
            {**stack.service_env("ray-head"), "RAY_AUTH_TOKEN_PATH": str(wrong_token)},
            False,
        ),
    }
    procs = {
        name: subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
        )
        for name, (argv, env, _) in checks.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        ok = checks[name][2]
        assert (proc.returncode == 0) == ok, f"{name}: exit {proc.returncode}\n{err[-2000:]}"
        if not ok:
            assert "LISTED" not in out and ("token" in err.lower() or "health-check" in name), f"{name}: {err[-2000:]}"
    nodes = stack.nodes()  # with the token
    assert sum(n["alive"] for n in nodes) == 3
    assert [n["cpu"] for n in nodes if n["head"]] == [0.0]  # --num-cpus=0: no trials on the head


def test_the_dashboard_wants_the_token(stack):
    """The dashboard's HTTP API (its job API runs code) answers only with the token; the page
    itself asks for it. Served only with ray[default] (the image installs it)."""
    if importlib.util.find_spec("aiohttp_cors") is None:
        pytest.skip(
            "ray[default] is not installed in the venv, so the Ray dashboard serves no HTTP: "
            'use "ray[default,tune]>=2.60,<3" in pyproject.toml\'s dependencies'
        )
    dashboard = f"http://{LOOPBACK}:{stack.dashboard_port}"
    wait_http(f"{dashboard}/api/gcs_healthz", 120)
    with urllib.request.urlopen(f"{dashboard}/api/authentication_mode", timeout=60) as resp:
        assert json.loads(resp.read())["authentication_mode"] == "token"
    assert dashboard_token_statuses(dashboard, stack.secrets["ray_auth_token"]) == DASHBOARD_TOKEN_EXPECTED


def test_mlflow_wants_a_login(stack):
    """The MLflow server runs its basic-auth app: no API answer without the cluster's login;
    /health stays open for the health checks."""
    assert mlflow_login_statuses(stack.tracking_uri, mlflow_login(stack.secrets)) == MLFLOW_LOGIN_EXPECTED


def role_password(stack, role: str) -> str:
    return stack.secrets[f"{role}_pgpass"].rsplit(":", 1)[1]


def as_role(stack, role: str, query: str, autocommit: bool = False, dbname: str | None = None) -> str:
    """``ok`` when ``role`` may run ``query`` (in database ``dbname``), else PostgreSQL's reason."""
    import psycopg2

    try:
        conn = stack.postgres.connect(dbname=dbname, user=role, password=role_password(stack, role))
    except psycopg2.Error as exc:
        return str(exc).strip().splitlines()[0].split("FATAL:", 1)[-1].strip()
    conn.autocommit = autocommit
    try:
        with conn.cursor() as cur:
            cur.execute(query)
        return "ok"
    except psycopg2.Error as exc:
        return str(exc).strip().splitlines()[0]
    finally:
        conn.close()


def test_each_service_connects_as_a_role_that_can_do_its_job_only(stack):
    """db-setup's roles: none a superuser; mlflow owns MLflow's tables and cannot read the studies;
    optuna owns the schema optuna and cannot read MLflow's tables (the users' password hashes among
    them) nor create any elsewhere; optuna_reader reads the studies and writes nothing."""
    conn = stack.postgres.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT rolname, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname !~ '^pg_'")
        roles = {name: flags for name, *flags in cur.fetchall()}
    conn.close()
    assert roles == {
        "postgres": [True, True, True],
        "mlflow_owner": [False] * 3,
        "mlflow": [False] * 3,
        "optuna": [False] * 3,
        "optuna_reader": [False] * 3,
    }
    expected = {
        ("mlflow", "SELECT count(*) FROM runs"): "ok",
        ("mlflow", "SELECT count(*) FROM optuna.studies"): "permission denied for schema optuna",
        ("optuna", "SELECT count(*) FROM optuna.trials"): "ok",
        ("optuna", "SELECT count(*) FROM public.users"): "permission denied for table users",
        ("optuna", "CREATE TABLE public.stray (i int)"): "permission denied for schema public",
        ("optuna_reader", "SELECT count(*) FROM optuna.trials"): "ok",
        ("optuna_reader", "DELETE FROM optuna.studies"): "cannot execute DELETE in a read-only transaction",
        ("optuna_reader", "SET TRANSACTION READ WRITE; DELETE FROM optuna.studies"): (
            "permission denied for table studies"  # and SELECT only, were its session writable
        ),
        ("optuna_reader", "SELECT count(*) FROM public.runs"): "permission denied for table runs",
    }
    assert {check: as_role(stack, *check) for check in expected} == expected


def database_state(stack) -> dict:
    """Who owns what, the roles' connection limits and settings, and who may connect where."""
    conn = stack.postgres.connect()
    with conn.cursor() as cur:
        cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mlflow'")
        owner = cur.fetchone()[0]
        cur.execute("SELECT nspname, pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname IN ('public', 'optuna')")
        schemas = dict(cur.fetchall())
        cur.execute(
            "SELECT rolname, rolcanlogin, rolconnlimit, coalesce(rolconfig, '{}') FROM pg_roles "
            "WHERE rolname IN ('mlflow_owner', 'mlflow', 'optuna', 'optuna_reader')"
        )
        roles = {name: (login, limit, sorted(config)) for name, login, limit, config in cur.fetchall()}
        cur.execute(
            "SELECT d.datname, r.rolname FROM pg_database d CROSS JOIN pg_roles r "
            "WHERE r.rolcanlogin AND NOT r.rolsuper AND has_database_privilege(r.oid, d.oid, 'CONNECT') "
            "AND d.datallowconn ORDER BY 1, 2"
        )
        connect = sorted(cur.fetchall())
    conn.close()
    return {"owner": owner, "schemas": schemas, "roles": roles, "connect": connect}


EXPECTED_DATABASE = {
    "owner": "mlflow_owner",
    "schemas": {"public": "mlflow", "optuna": "optuna"},
    "roles": {  # connection limits: docs/cluster.md's budget (MLFLOW_WORKERS up to 4)
        "mlflow_owner": (False, -1, []),
        "mlflow": (True, 65, []),
        "optuna": (True, 13, []),
        "optuna_reader": (True, 5, ["default_transaction_read_only=on", "statement_timeout=60s"]),
    },
    "connect": [("mlflow", "mlflow"), ("mlflow", "optuna"), ("mlflow", "optuna_reader")],
}


def test_database_roles_hold_their_boundaries(stack):
    """Issue 28: the database belongs to a role no one logs in as, so mlflow cannot drop it nor touch
    the schema optuna; optuna_reader's sessions are read-only (no INSERT, no TEMP table) and its
    statements time out (its settings: a 60 s statement is not waited for here); no role but the
    superuser connects to postgres or template1; each role has its connection limit."""
    assert database_state(stack) == EXPECTED_DATABASE
    expected = {
        ("mlflow", "DROP DATABASE mlflow"): "must be owner of database mlflow",
        ("mlflow", "DROP SCHEMA optuna CASCADE"): "must be owner of schema optuna",
        ("mlflow", "CREATE TABLE optuna.stray (i int)"): "permission denied for schema optuna",
        ("mlflow", "CREATE SCHEMA stray"): "permission denied for database mlflow",
        ("optuna", "DROP DATABASE mlflow"): "must be owner of database mlflow",
        ("optuna_reader", "INSERT INTO optuna.studies (study_name) VALUES ('x')"): (
            "cannot execute INSERT in a read-only transaction"
        ),
        ("optuna_reader", "CREATE TEMP TABLE t (i int)"): "cannot execute CREATE TABLE in a read-only transaction",
        ("optuna_reader", "SET TRANSACTION READ WRITE; CREATE TEMP TABLE t (i int)"): (
            'permission denied to create temporary tables in database "mlflow"'
        ),
    }
    found = {check: as_role(stack, *check, autocommit=check[1].startswith("DROP DATABASE")) for check in expected}
    assert found == expected
    for role in ("mlflow", "optuna", "optuna_reader"):
        for database in ("postgres", "template1"):
            assert as_role(stack, role, "SELECT 1", dbname=database) == (
                f'permission denied for database "{database}"'
            ), (role, database)


def test_db_setup_migrates_a_database_of_the_previous_version(stack):
    """A database db-setup's previous version made (owned by mlflow, public owned by the database
    owner, CONNECT and TEMP open on postgres and template1, no limits, a writable reader): db-setup,
    run again, hands it to mlflow_owner and sets every boundary; the MLflow server and Optuna go on
    as before. db-setup runs at every `up`: twice in a row changes nothing."""
    import optuna

    conn = stack.postgres.connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        for statement in (
            "ALTER DATABASE mlflow OWNER TO mlflow",
            "ALTER SCHEMA public OWNER TO pg_database_owner",
            "GRANT CONNECT, TEMPORARY ON DATABASE postgres, template1 TO PUBLIC",
            "ALTER ROLE optuna_reader RESET ALL",
            "ALTER ROLE mlflow CONNECTION LIMIT -1",
            "ALTER ROLE optuna CONNECTION LIMIT -1",
            "ALTER ROLE optuna_reader CONNECTION LIMIT -1",
            "DROP ROLE mlflow_owner",
        ):
            cur.execute(statement)
    conn.close()
    assert database_state(stack)["owner"] == "mlflow"
    stack.run_setup("db-setup")
    assert database_state(stack) == EXPECTED_DATABASE
    stack.run_setup("db-setup")
    assert database_state(stack) == EXPECTED_DATABASE
    client = client_for(stack)  # the MLflow server, as mlflow, writes MLflow's tables
    run = client.create_run(client.create_experiment(f"migrated_{uuid.uuid4().hex[:8]}"))
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
    storage = optuna.storages.RDBStorage(
        stack.service_env("driver")["LPT_OPTUNA_STORAGE"],
        engine_kwargs={"connect_args": {"password": role_password(stack, "optuna")}},
    )
    study = optuna.create_study(storage=storage, study_name=f"migrated-{uuid.uuid4().hex[:8]}")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2
    storage.engine.dispose()


def test_the_searches_mlflow_user_writes_runs_and_administers_nothing(stack, monkeypatch):
    """mlflow-setup's user searcher: no admin; it writes the runs of an experiment made before it
    existed once mlflow-setup ran again (EDIT); MLflow's admin API and another's experiment's
    deletion refuse it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    searcher = mlflow_login(stack.secrets)
    admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": stack.secrets["mlflow_admin_password"]}
    client = MlflowClient(stack.tracking_uri)
    with monkeypatch.context() as patch:
        for key, value in admin.items():
            patch.setenv(key, value)
        assert AuthServiceClient(stack.tracking_uri).get_user("searcher").is_admin is False
        experiment = client.create_experiment(f"made_by_admin_{uuid.uuid4().hex[:8]}")
    with pytest.raises(MlflowException, match="403"):
        client.create_run(experiment)  # READ, MLflow's default for any user
    assert "EDIT granted on 1 of" in stack.run_setup("mlflow-setup")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "m", 1.0)
    client.set_terminated(run.info.run_id)
    as_searcher = basic_auth(searcher["MLFLOW_TRACKING_USERNAME"], searcher["MLFLOW_TRACKING_PASSWORD"])
    api = f"{stack.tracking_uri}/api/2.0/mlflow"
    assert http_status(f"{api}/users/get?username=admin", as_searcher) == 403
    auth = AuthServiceClient(stack.tracking_uri)
    for _name, call in {
        "create a user": lambda: auth.create_user("intruder", "x" * 16),
        "become an admin": lambda: auth.update_user_admin("searcher", True),
        "change the admin's password": lambda: auth.update_user_password("admin", "x" * 16),
        "delete the admin's experiment": lambda: client.delete_experiment(experiment),
    }.items():
        with pytest.raises(MlflowException, match="403"):
            call()


def test_optuna_dashboard_reads_the_studies_and_deletes_nothing(stack, tmp_path):
    """The optuna-dashboard service's command, as optuna_reader: it lists a study the role optuna
    made; its delete button fails and the study stays."""
    import optuna

    services = stack.services
    driver_url = stack.service_env("driver")["LPT_OPTUNA_STORAGE"]
    storage = optuna.storages.RDBStorage(
        driver_url, engine_kwargs={"connect_args": {"password": role_password(stack, "optuna")}}
    )
    name = f"dashboard-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(storage=storage, study_name=name)
    study.enqueue_trial({"x": 1})
    port = free_port()
    argv = localize(command_of(services["optuna-dashboard"]), stack.subst, {"--host": LOOPBACK, "--port": port})
    dashboard = Proc("optuna-dashboard", argv, stack.service_env("optuna-dashboard"), tmp_path / "dashboard.log")
    stack.procs.append(dashboard)
    try:
        url = f"http://{LOOPBACK}:{port}"
        wait_http(f"{url}/api/studies", 120, dashboard)
        with urllib.request.urlopen(f"{url}/api/studies", timeout=60) as resp:
            listed = {s["study_name"]: s["study_id"] for s in json.loads(resp.read())["study_summaries"]}
        assert name in listed
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(
                urllib.request.Request(f"{url}/api/studies/{listed[name]}", method="DELETE"), timeout=60
            )
        assert refused.value.code == 500 and "StorageInternalError" in dashboard.tail(20000)  # permission denied
        assert optuna.load_study(study_name=name, storage=storage).study_name == name
    finally:
        dashboard.stop()


def test_search_spreads_over_both_workers_into_the_mlflow_server(stack, tmp_path):
    before = searches(stack, "prompt_pool-smoke")
    # each worker has one logical GPU (no CUDA here): trials asking for half a GPU are placed on it
    proc = start_search(stack, tmp_path, "--trials", "4", "--set", "phase2.epochs=3", "--set", "resources.gpu=0.5")
    finish(proc)
    folder = new_search_folder(stack, "prompt_pool-smoke", before)
    record = json.loads((folder / "search.json").read_text())
    assert record["tracking_uri"] == stack.tracking_uri

    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(rows) == 4 and len({r["trial_id"] for r in rows}) == 4

    client = client_for(stack)
    parent = client.get_run(record["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["lpt.role"] == "study"
    runs = trial_runs(client, record)
    assert sorted(r.data.tags["lpt.trial_id"] for r in runs) == sorted(r["trial_id"] for r in rows)
    assert {r.info.run_id for r in runs} == {r["mlflow_run_id"] for r in rows}
    nodes = {r.data.tags["lpt.node"] for r in runs}
    assert nodes == set(stack.worker_ids), f"trial nodes {nodes}, workers {stack.worker_ids}, head {stack.head_id}"
    assert stack.head_id not in nodes
    assert all(r.info.status == "FINISHED" and "val_acc" in r.data.metrics for r in runs)
    # Ray gave each trial GPU 0 of its node; device auto found no CUDA there and used the CPU
    assert {(r.data.tags["lpt.gpu_ids"], r.data.tags["lpt.device"]) for r in runs} == {("0", "cpu")}

    # artifacts went through the server (--serve-artifacts) into --artifacts-destination
    best = [r for r in runs if r.data.tags.get("lpt.best") == "true"]
    assert len(best) == 1 and "test_acc" in best[0].data.metrics
    names = [a.path for a in client.list_artifacts(best[0].info.run_id)]
    assert any(n.endswith(".safetensors") for n in names), names
    assert list(stack.artifacts.rglob("*.safetensors"))

    # and the runs are rows of the PostgreSQL backend store
    conn = stack.postgres.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs WHERE run_uuid = ANY(%s)", ([r.info.run_id for r in runs],))
            assert cur.fetchone()[0] == 4
    finally:
        conn.close()


def test_search_survives_losing_a_worker_node(stack, tmp_path):
    """Kill worker 2 (its `ray start --block` process group, SIGKILL) while it runs a trial that
    has checkpointed an epoch: the trial is retried on worker 1 from that checkpoint, in the same
    MLflow run, and the search ends with its whole budget."""
    study = yaml.safe_load((ROOT / "studies" / "prompt_pool.yaml").read_text())
    study["budget"]["max_failures"] = 5
    study["early_stopping"]["enabled"] = False  # ASHA must not end the victim before the kill
    study_file = tmp_path / "node_loss.yaml"
    study_file.write_text(yaml.safe_dump(study))
    epochs, budget = 3, 3
    before = searches(stack, "node_loss-smoke")
    proc = start_search(
        stack, tmp_path, "--trials", str(budget), "--set", f"phase2.epochs={epochs}", flags={"--study": str(study_file)}
    )
    client = client_for(stack)
    worker2 = stack.worker_ids[1]
    victim, deadline = None, time.time() + 300
    try:
        while victim is None:
            assert time.time() < deadline, f"no trial checkpointed on worker 2 in time:\n{proc.tail()}"
            assert proc.alive(), f"the search ended before worker 2 could be killed:\n{proc.tail()}"
            time.sleep(1)
            found = [p for p in (stack.shared / "runs").glob("node_loss-smoke-*/search.json") if p.parent not in before]
            if not found:
                continue
            record = json.loads(found[0].read_text())
            for run in trial_runs(client, record):
                if run.data.tags.get("lpt.node") != worker2 or run.info.status != "RUNNING":
                    continue
                trial_id = run.data.tags["lpt.trial_id"]
                steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
                checkpoints = list(found[0].parent.glob(f"*{trial_id}*/checkpoint_*"))
                if steps and max(steps) < epochs and checkpoints:
                    victim = (trial_id, run.info.run_id, max(steps))
                    break
        time.sleep(1)  # let the driver register the checkpoint it was just told about
        killed_at = time.time()
        stack.workers[1].kill()
        print(f"killed worker 2 while trial {victim[0]} was past epoch {victim[2]}")
        finish(proc)
    finally:
        proc.stop()
    print(f"the search finished {time.time() - killed_at:.0f} s after the kill")

    folder = new_search_folder(stack, "node_loss-smoke", before)
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(rows) == budget and len({r["trial_id"] for r in rows}) == budget
    assert all(r["status"] == "completed" for r in rows), rows
    record = json.loads((folder / "search.json").read_text())
    runs = trial_runs(client, record)
    assert len(runs) == budget  # the retry reused the trial's run
    run = client.get_run(victim[1])
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("lpt.resumed") == "true"
    assert int(run.data.tags["lpt.resumed_at_epoch"]) >= 1
    assert run.data.tags["lpt.node"] == stack.worker_ids[0]  # the retry ran on the surviving worker
    steps = sorted({m.step for m in client.get_metric_history(victim[1], "val_acc")})
    assert steps == list(range(1, epochs + 1))


def test_only_the_registrar_changes_a_registered_model(stack, tmp_path, monkeypatch, request):
    """mlflow-setup's registrar registers a model (tune/serving/registry.py, into the experiment
    lpt-models); searcher, the login of every Ray node and the driver, can neither upload over the
    version's files (HTTP 403 from the artifact proxy; its own run's artifacts still upload) nor
    update, tag, alias or delete the registered model or its version, nor add a version, even on a
    model it made itself once mlflow-setup ran again; a code file written into the stored model
    makes it refused where it loads."""
    import mlflow
    import requests
    import torch
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from test_model_registry import CONFIG, PROFILE

    from lpt_core import LPT, build_backbone_from_spec, save_prompts
    from lpt_core.data import build_dataset
    from tune import names
    from tune.config.study import ProfileConfig
    from tune.serving import model as lpt_model
    from tune.serving.check import ModelRefused
    from tune.serving.registry import MODELS_EXPERIMENT, register_best
    from tune.trial.table import TrialRow

    searcher = mlflow_login(stack.secrets)
    registrar = mlflow_login(stack.secrets, "mlflow_registrar_credentials")
    assert registrar["MLFLOW_TRACKING_USERNAME"] == "registrar" != searcher["MLFLOW_TRACKING_USERNAME"]
    client = MlflowClient(stack.tracking_uri)
    mlflow.set_tracking_uri(stack.tracking_uri)
    request.addfinalizer(lambda: mlflow.set_tracking_uri(None))  # process-global: not for the tests after this one
    # what a search leaves, written by searcher (this process's login)
    study = f"registry_{uuid.uuid4().hex[:8]}"
    experiment = client.create_experiment(study)
    parent = client.create_run(experiment, tags={names.ROLE: "study"}).info.run_id
    trial = client.create_run(experiment, tags={names.ROLE: "trial", names.TRIAL_ID: "trial0"}).info.run_id
    client.set_terminated(trial)
    data = build_dataset(PROFILE["data"])
    torch.manual_seed(PROFILE["seed"])
    model = LPT(build_backbone_from_spec(PROFILE["backbone"]), data.num_classes, **{**PROFILE["model"], **CONFIG})
    prompt_file = tmp_path / "trial0.safetensors"
    save_prompts(model, prompt_file)
    stack.run_setup("mlflow-setup")  # what runs before `docker compose run register`: registrar may tag the study

    def register():
        return register_best(
            stack.tracking_uri,
            "cluster-tiny",
            study=study,
            profile_name="tiny",
            profile=ProfileConfig.model_validate(PROFILE),
            data=data,
            best=TrialRow(trial_id="trial0", status="completed", mlflow_run_id=trial, val_acc=50.0, params=CONFIG),
            config=CONFIG,
            prompt_file=prompt_file,
            test={"test_acc": 40.0},
            parent_run_id=parent,
        )

    with monkeypatch.context() as patch:
        for key, value in registrar.items():
            patch.setenv(key, value)
        assert register() == "models:/cluster-tiny/1"
    version = client.get_model_version("cluster-tiny", "1")
    model_run = client.get_run(version.run_id)
    assert client.get_experiment(model_run.info.experiment_id).name == MODELS_EXPERIMENT
    assert client.get_run(parent).data.tags["lpt.model_uri"] == "models:/cluster-tiny/1"
    stored = client.get_logged_model(model_run.outputs.model_outputs[0].model_id).artifact_location
    assert stored.startswith("mlflow-artifacts:/"), stored
    files = stored.removeprefix("mlflow-artifacts:/").strip("/")

    # searcher: the version's files through the artifact proxy, a code file added or the MLmodel replaced
    as_searcher = basic_auth(searcher["MLFLOW_TRACKING_USERNAME"], searcher["MLFLOW_TRACKING_PASSWORD"])
    proxy = f"{stack.tracking_uri}/api/2.0/mlflow-artifacts/artifacts"

    def upload(path: str) -> int:
        request = urllib.request.Request(f"{proxy}/{path}", data=b"import os\n", method="PUT", headers=as_searcher)
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert upload(f"{files}/data/lpt/lpt_model_code.py") == 403
    assert upload(f"{files}/MLmodel") == 403
    assert upload(f"{experiment}/{trial}/artifacts/note.py") == 200  # its own run's artifacts: the URL is right
    assert not list(stack.artifacts.rglob("lpt_model_code.py"))
    mlmodel = tmp_path / "MLmodel"
    mlmodel.write_text("flavors: {}\n")
    refused = {
        "log an artifact on the model's run": lambda: client.log_artifact(version.run_id, str(mlmodel), "model"),
        "update the model": lambda: client.update_registered_model("cluster-tiny", "changed"),
        "rename the model": lambda: client.rename_registered_model("cluster-tiny", "renamed"),
        "tag the version": lambda: client.set_model_version_tag("cluster-tiny", "1", "k", "v"),
        "alias the version": lambda: client.set_registered_model_alias("cluster-tiny", "prod", "1"),
        "update the version": lambda: client.update_model_version("cluster-tiny", "1", "changed"),
        "add a version": lambda: client.create_model_version("cluster-tiny", f"runs:/{trial}/model", trial),
        "delete the version": lambda: client.delete_model_version("cluster-tiny", "1"),
        "delete the model": lambda: client.delete_registered_model("cluster-tiny"),
    }
    for what, call in refused.items():  # MLflow's error, or the artifact upload's HTTPError
        with pytest.raises((MlflowException, requests.HTTPError), match="403|PERMISSION_DENIED"):
            call()
            pytest.fail(f"searcher could {what}")
    assert client.get_model_version("cluster-tiny", "1").description == version.description

    # a model searcher made itself (MANAGE, as its creator) is READ once mlflow-setup has run
    client.create_registered_model("squatted")
    client.update_registered_model("squatted", "mine")
    assert "grants revoked" in stack.run_setup("mlflow-setup")
    with pytest.raises(MlflowException, match="403|PERMISSION_DENIED"):
        client.update_registered_model("squatted", "still mine?")

    # the version loads as searcher reads it; with a code file written into its files, it is refused
    assert lpt_model.load_model("models:/cluster-tiny/1").unwrap_python_model().classifier is not None
    on_disk = stack.artifacts / files
    (on_disk / "data" / "lpt" / "hook.py").write_text("import os\n")
    with pytest.raises(ModelRefused, match=r"^models:/cluster-tiny/1/data/lpt/hook\.py: a code file the LPT model"):
        lpt_model.load_model("models:/cluster-tiny/1")


def test_rotations_change_passwords_in_place(stack):
    """The set-up's rotations (scripts/cluster-setup.sh --rotate runs them in the one-shot
    services): the superuser's password (ALTER ROLE, the old one on stdin), a role's (db-setup sets
    it to its new pgpass file), the MLflow admin's and the searcher's (MLflow's update-password);
    each new password logs in, the old one does not, and what the stack holds stays. Last in this
    module: the stack's passwords change."""
    import psycopg2
    from mlflow import MlflowClient

    runs_before = MlflowClient(stack.tracking_uri).search_experiments()
    new = {name: uuid.uuid4().hex + uuid.uuid4().hex[:16] for name in ("postgres", "optuna", "admin", "searcher")}
    secrets = stack.secrets_dir

    old = stack.postgres.password
    assert "password of postgres changed" in stack.run_setup(
        "db-setup", "python", "scripts/cluster_roles.py", "rotate-superuser", stdin=f"{old}\n{new['postgres']}\n"
    )
    (secrets / "postgres_password").write_text(new["postgres"])
    stack.postgres.password = new["postgres"]
    old_optuna = role_password(stack, "optuna")
    (secrets / "optuna_pgpass").write_text(f"*:*:mlflow:optuna:{new['optuna']}")
    stack.secrets["optuna_pgpass"] = (secrets / "optuna_pgpass").read_text()
    stack.run_setup("db-setup")  # as the superuser, with its new password
    for user, password in (("postgres", old), ("optuna", old_optuna)):
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            stack.postgres.connect(user=user, password=password)
    assert as_role(stack, "optuna", "SELECT count(*) FROM optuna.trials") == "ok"

    old_admin = stack.secrets["mlflow_admin_password"]
    assert "password of admin changed" in stack.run_setup(
        "mlflow-setup", "python", "scripts/cluster_roles.py", "rotate-admin", stdin=f"{old_admin}\n{new['admin']}\n"
    )
    (secrets / "mlflow_admin_password").write_text(new["admin"])
    old_searcher = mlflow_login(stack.secrets)["MLFLOW_TRACKING_PASSWORD"]
    (secrets / "mlflow_credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = searcher\nmlflow_tracking_password = {new['searcher']}\n"
    )
    stack.run_setup("mlflow-setup")  # as the admin, with its new password
    os.environ["MLFLOW_TRACKING_PASSWORD"] = new["searcher"]  # this process logs in as the searcher (undone at the end)
    api = f"{stack.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert {
        who: http_status(api, basic_auth(user, password))
        for who, user, password in (
            ("old admin", "admin", old_admin),
            ("new admin", "admin", new["admin"]),
            ("old searcher", "searcher", old_searcher),
            ("new searcher", "searcher", new["searcher"]),
        )
    } == {"old admin": 401, "new admin": 200, "old searcher": 401, "new searcher": 200}
    assert [e.experiment_id for e in MlflowClient(stack.tracking_uri).search_experiments()] == [
        e.experiment_id for e in runs_before
    ]
