"""docker-compose.yml's stack without Docker: the commands its services run, started as local
processes on loopback (see cluster_fixtures.py) -- a Ray head without CPUs and two Ray worker nodes,
with token authentication on; PostgreSQL and the MLflow server on it; and the driver service's search
command. The searches must spread over both workers, land in that MLflow server, and survive the
loss of a worker node.

Slow (a few minutes on two cores). Needs PostgreSQL's server binaries and psycopg2 in the venv;
skips with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cluster_fixtures import (DASHBOARD_TOKEN_EXPECTED, LOOPBACK, MLFLOW_LOGIN_EXPECTED, ROOT, VENV_BIN, LocalStack,
                              Proc, dashboard_token_statuses, login_to_mlflow, mlflow_login, mlflow_login_statuses,
                              postgres_unavailable, wait_http)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]   # every wait inside has its own limit too

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
    login = login_to_mlflow(stack.secrets)   # this process reads the MLflow server as the driver does
    try:
        started = time.time()
        stack.start_postgres()
        stack.start_mlflow()              # migrates the database while Ray starts
        stack.start_head()
        stack.add_workers(2)
        stack.wait_mlflow()
        nodes = stack.nodes(expect_alive=3)
        stack.head_id = next(n["node_id"] for n in nodes if n["head"])
        stack.worker_ids = [next(n["node_id"] for n in nodes if n["port"] == port) for port in stack.worker_ports]
        print(f"stack up in {time.time() - started:.0f} s: head {stack.head_id[:12]}, "
              f"workers {[w[:12] for w in stack.worker_ids]}, MLflow {stack.tracking_uri}")
        yield stack
    finally:
        stack.stop()
        login.undo()


def client_for(stack):
    from mlflow import MlflowClient
    return MlflowClient(tracking_uri=stack.tracking_uri)


def new_search_folder(stack, prefix: str, before: set) -> Path:
    found = [p for p in (stack.shared / "runs").glob(f"{prefix}-*") if p not in before and (p / "search.json").is_file()]
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
    return client.search_runs([record["experiment_id"]],
                              f"tags.`mlflow.parentRunId` = '{record['parent_run_id']}' and tags.`lpt.role` = 'trial'",
                              max_results=200)


def test_the_cluster_refuses_a_client_without_the_token(stack):
    """A Ray client with a wrong token, or one that does not use token auth at all, is refused;
    so is the compose file's health check of the head (`ray health-check`) without the token."""
    code = ("import sys\nfrom ray._raylet import GcsClient\n"
            "GcsClient(address=sys.argv[1]).get_all_node_info(timeout=10)\nprint('LISTED')")
    right = stack.service_env("driver")
    wrong_token = stack.workdir / "wrong_token"
    wrong_token.write_text("not-the-token")
    wrong = {**right, "RAY_AUTH_TOKEN_PATH": str(wrong_token)}
    # no auth configured at all; HOME without ~/.ray/auth_token to fall back on
    none = {k: v for k, v in right.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    none["HOME"] = str(stack.workdir)
    list_nodes = [sys.executable, "-c", code, stack.ray_address]
    health = [str(VENV_BIN / "ray"), "health-check", "--address", stack.ray_address]
    checks = {"client, wrong token": (list_nodes, wrong, False), "client, no auth": (list_nodes, none, False),
              "health-check": (health, stack.service_env("ray-head"), True),
              "health-check, wrong token": (health, {**stack.service_env("ray-head"), "RAY_AUTH_TOKEN_PATH": str(wrong_token)},
                                            False)}
    procs = {name: subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    stdin=subprocess.DEVNULL) for name, (argv, env, _) in checks.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        ok = checks[name][2]
        assert (proc.returncode == 0) == ok, f"{name}: exit {proc.returncode}\n{err[-2000:]}"
        if not ok:
            assert "LISTED" not in out and ("token" in err.lower() or "health-check" in name), f"{name}: {err[-2000:]}"
    nodes = stack.nodes()            # with the token
    assert sum(n["alive"] for n in nodes) == 3
    assert [n["cpu"] for n in nodes if n["head"]] == [0.0]   # --num-cpus=0: no trials on the head


def test_the_dashboard_wants_the_token(stack):
    """The dashboard's HTTP API (its job API runs code) answers only with the token; the page
    itself asks for it. Served only with ray[default] (the image installs it)."""
    if importlib.util.find_spec("aiohttp_cors") is None:
        pytest.skip("ray[default] is not installed in the venv, so the Ray dashboard serves no HTTP: "
                    "use \"ray[default,tune]>=2.60,<3\" in pyproject.toml's dependencies")
    dashboard = f"http://{LOOPBACK}:{stack.dashboard_port}"
    wait_http(f"{dashboard}/api/gcs_healthz", 120)
    with urllib.request.urlopen(f"{dashboard}/api/authentication_mode", timeout=60) as resp:
        assert json.loads(resp.read())["authentication_mode"] == "token"
    assert dashboard_token_statuses(dashboard, stack.secrets["ray_auth_token"]) == DASHBOARD_TOKEN_EXPECTED


def test_mlflow_wants_a_login(stack):
    """The MLflow server runs its basic-auth app: no API answer without the cluster's login;
    /health stays open for the health checks."""
    assert mlflow_login_statuses(stack.tracking_uri, mlflow_login(stack.secrets)) == MLFLOW_LOGIN_EXPECTED


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
    study["early_stopping"]["enabled"] = False   # ASHA must not end the victim before the kill
    study_file = tmp_path / "node_loss.yaml"
    study_file.write_text(yaml.safe_dump(study))
    epochs, budget = 3, 3
    before = searches(stack, "node_loss-smoke")
    proc = start_search(stack, tmp_path, "--trials", str(budget), "--set", f"phase2.epochs={epochs}",
                        flags={"--study": str(study_file)})
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
    assert len(runs) == budget                      # the retry reused the trial's run
    run = client.get_run(victim[1])
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("lpt.resumed") == "true"
    assert int(run.data.tags["lpt.resumed_at_epoch"]) >= 1
    assert run.data.tags["lpt.node"] == stack.worker_ids[0]    # the retry ran on the surviving worker
    steps = sorted({m.step for m in client.get_metric_history(victim[1], "val_acc")})
    assert steps == list(range(1, epochs + 1))
