"""docker-compose.yml's stack built and run in Docker, as a user would.

Set-up: a Docker daemon (started here as root when none answers: scripts/system-deps.sh installs
docker.io, docker-compose, iptables and debootstrap), the base images (pulled, or where no image
registry can be reached, stand-ins built from a Debian root filesystem: tests/docker/), the
project's image (`docker build`; the daemon's layer cache makes a second run take minutes), then
`scripts/cluster-setup.sh` and `docker-compose up -d --scale ray-worker=2` in a folder of its own.

Checks: the stack comes up healthy with two workers; MLflow and the Ray dashboard refuse requests
without the login or the token (401); no secret value in any container's `docker inspect`; every
process of the project's containers runs as the image's user (PostgreSQL's own container aside);
a 6-trial smoke search from the driver container runs trials on both worker containers into the
MLflow server, and ends with all 6 trials done (none failed) although a worker container is killed
in the middle of it. Everything is torn down (`down -v`); the images and the build cache stay.

Slow: about 10 minutes for the first build on two cores (torch's CUDA wheels), a few minutes
after that. Skips with the reason where no daemon can be started (not root, no docker).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster_fixtures import (COMPOSE_FILE, DASHBOARD_TOKEN_EXPECTED, LIST_NODES, MLFLOW_LOGIN_EXPECTED, ROOT,
                              cluster_setup, dashboard_token_statuses, free_port, login_to_mlflow, mlflow_login,
                              mlflow_login_statuses)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]   # every wait inside has its own limit

IMAGE = "lpt-studies:test"
BASE_IMAGES = {"python:3.11-slim": "python", "postgres:16-bookworm": "postgres"}   # image: tests/docker/<folder>
DEBIAN = "local/debian:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SERVICE_UID = 10001
WORKERS = 2
TRIALS = 6
SEARCH = ("python", "tune/search.py", "--study", "prompt_pool", "--profile", "smoke", "--trials", str(TRIALS),
          "--set", "phase1.epochs=1", "--set", "phase2.epochs=3", "--storage", "/shared/runs")
SEARCH_TIMEOUT_S = 900
TIMINGS: dict[str, float] = {}


def sh(argv: list[str], timeout: float, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{' '.join(map(str, argv[:6]))} ...` failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def timed(name: str, started: float) -> None:
    TIMINGS[name] = round(time.time() - started, 1)
    print(f"[docker test] {name}: {TIMINGS[name]:.0f} s", flush=True)


# ---------------------------------------------------------------- the engine

def daemon_answers() -> bool:
    try:
        return sh(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A Docker daemon: the one that answers, or dockerd started here (as root) and stopped after."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the Docker test runs on Linux only")
    missing = [tool for tool in ("docker", "docker-compose") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: `apt-get install docker.io docker-compose iptables "
                    "debootstrap` (scripts/system-deps.sh does it when run as root)")
    if daemon_answers():
        yield
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("no Docker daemon answers, and starting one needs root and dockerd (Debian's docker.io)")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    try:
        deadline = time.time() + 90
        while not daemon_answers():
            if daemon.poll() is not None or time.time() > deadline:
                pytest.fail(f"dockerd did not start ({daemon.poll()}):\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(1)
        yield
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)   # dockerd stops its containerd and containers
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=30)


def image_exists(name: str) -> bool:
    return sh(["docker", "image", "inspect", name], timeout=60, check=False).returncode == 0


def debian_image(workdir: Path) -> None:
    """``local/debian:bookworm``: a minimal Debian root filesystem (debootstrap) imported as an image."""
    if image_exists(DEBIAN):
        return
    if shutil.which("debootstrap") is None:
        pytest.skip(f"the base images {list(BASE_IMAGES)} are missing and cannot be pulled, and debootstrap (to build "
                    "stand-ins) is not installed: `apt-get install debootstrap`")
    rootfs = workdir / "rootfs"
    try:
        sh(["debootstrap", "--variant=minbase", "bookworm", rootfs, DEBIAN_MIRROR], timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["docker", "import", "-", DEBIAN], stdin=tar.stdout, capture_output=True,
                                  text=True, timeout=600)
        tar.stdout.close()
        assert tar.wait(timeout=60) == 0 and imported.returncode == 0, imported.stderr
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


@pytest.fixture(scope="module")
def base_images(engine, tmp_path_factory):
    """python:3.11-slim and postgres:16-bookworm: present, pulled, or stand-ins built here."""
    started = time.time()
    workdir = tmp_path_factory.mktemp("base-images")
    for name, folder in BASE_IMAGES.items():
        if image_exists(name):
            continue
        try:
            if sh(["docker", "pull", "-q", name], timeout=120, check=False).returncode == 0:
                continue
        except subprocess.TimeoutExpired:
            pass
        debian_image(workdir)
        context = workdir / folder
        shutil.copytree(ROOT / "tests" / "docker" / folder, context)
        ca = Path("/etc/ssl/certs/ca-certificates.crt")   # pip in the image trusts what the host trusts
        (context / "ca-certificates.crt").write_bytes(ca.read_bytes() if ca.exists() else b"")
        sh(["docker", "build", "-q", "-t", name, context], timeout=900)
    timed("base images", started)


@pytest.fixture(scope="module")
def image(base_images):
    """The project's image, built like `docker compose build` does (the layer cache kept)."""
    started = time.time()
    sh(["docker", "build", "-t", IMAGE, ROOT], timeout=1800)
    timed("image build", started)
    size = sh(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE], timeout=60).stdout.strip()
    print(f"[docker test] image {IMAGE}: {int(size) / 1e9:.1f} GB", flush=True)
    return IMAGE


# ---------------------------------------------------------------- the stack

class Stack:
    def __init__(self, workdir: Path, image_name: str):
        self.workdir = workdir
        shutil.copy(COMPOSE_FILE, workdir / "docker-compose.yml")
        _, self.secrets = cluster_setup(workdir)
        self.mlflow_port, self.dashboard_port = free_port(), free_port()
        settings = {"LPT_IMAGE": image_name, "RAY_WORKER_CPUS": "1", "MLFLOW_WORKERS": "1", "RAY_SHM_SIZE": "1gb",
                    "MLFLOW_PORT": self.mlflow_port, "RAY_DASHBOARD_PORT": self.dashboard_port}
        with open(workdir / ".env", "a") as env:
            env.writelines(f"{k}={v}\n" for k, v in settings.items())
        (workdir / "data").mkdir(mode=0o755)
        self.project = f"lpttest{os.getpid()}"
        self.compose = ["docker-compose", "-p", self.project, "--project-directory", workdir,
                        "-f", workdir / "docker-compose.yml"]

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return sh([*self.compose, *args], timeout=timeout, check=check, cwd=self.workdir)

    def containers(self, service: str | None = None, every: bool = False) -> list[str]:
        """Container ids of the project (of one service), running ones unless ``every``."""
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        out = sh(["docker", "ps", "-q", "--no-trunc", *(["-a"] if every else []), *filters], timeout=60).stdout
        return out.split()

    def inspect(self, container: str) -> dict:
        return json.loads(sh(["docker", "inspect", container], timeout=60).stdout)[0]

    def health(self, service: str) -> str:
        ids = self.containers(service)
        return self.inspect(ids[0])["State"].get("Health", {}).get("Status", "none") if ids else "absent"

    def exec_as_user(self, container: str, *argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """A command in a running container as the service user (the container's environment)."""
        return sh(["docker", "exec", "--user", str(SERVICE_UID), container, *argv], timeout=timeout)

    def nodes(self, alive: int = -1, timeout_s: float = 120) -> list[dict]:
        head = self.containers("ray-head")[0]
        out = self.exec_as_user(head, "python", "-c", LIST_NODES, "127.0.0.1:6379", str(alive), str(timeout_s),
                                timeout=timeout_s + 90).stdout
        return json.loads(out.strip().splitlines()[-1])

    def worker_nodes(self) -> dict[str, str]:
        """{Ray node id: worker container id}, matched by the containers' addresses."""
        ips = {}
        for container in self.containers("ray-worker"):
            for net in self.inspect(container)["NetworkSettings"]["Networks"].values():
                ips[net["IPAddress"]] = container
        return {n["node_id"]: ips[n["ip"]] for n in self.nodes() if n["alive"] and n["ip"] in ips}

    def logs(self) -> str:
        return self.run("logs", "--no-color", "--tail", "60", timeout=120, check=False).stdout[-12000:]


@pytest.fixture(scope="module")
def stack(image, tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("docker-stack"), image)
    login = login_to_mlflow(stack.secrets)   # this process reads the MLflow server as the driver does
    started = time.time()
    try:
        stack.run("up", "-d", "--no-build", "--scale", f"ray-worker={WORKERS}", timeout=600)
        deadline = time.time() + 300
        while {s: stack.health(s) for s in ("postgres", "mlflow", "ray-head")} != dict.fromkeys(
                ("postgres", "mlflow", "ray-head"), "healthy"):
            assert time.time() < deadline, f"the services are not healthy after 300 s:\n{stack.logs()}"
            time.sleep(2)
        nodes = stack.nodes(alive=1 + WORKERS)
        assert sum(n["alive"] for n in nodes) == 1 + WORKERS, f"{nodes}\n{stack.logs()}"
        timed("stack up", started)
        yield stack
    finally:
        try:
            stack.run("down", "-v", "--timeout", "20", timeout=300, check=False)
        finally:
            login.undo()


# ---------------------------------------------------------------- checks shared by the tests

def secret_values(secrets: dict) -> list[str]:
    return [secrets[n] for n in ("ray_auth_token", "postgres_password", "mlflow_admin_password",
                                 "mlflow_flask_secret_key")]


def assert_no_secret_in_inspect(stack: Stack, containers: list[str]) -> None:
    """Nothing `docker inspect` shows (environment, command, labels, mounts) holds a secret value."""
    for container in containers:
        shown = json.dumps(stack.inspect(container))
        name = stack.inspect(container)["Name"]
        for value in secret_values(stack.secrets):
            assert value not in shown, f"{name}: a secret value in `docker inspect`"


def processes(container: str) -> set[tuple[int, int, str]]:
    rows = sh(["docker", "top", container, "-eo", "uid,pid,args"], timeout=60).stdout.strip().splitlines()[1:]
    return {(int(uid), int(pid), args.strip()) for uid, pid, args in (row.split(None, 2) for row in rows)}


def assert_service_user(stack: Stack, containers: list[str]) -> None:
    """Every process in the project's containers (PID 1, tini, included) runs as the image's user.
    The entrypoint of a health check is root for a moment before it drops to the user: a process
    counts only when it is still there, as another user, two seconds later."""
    first = {c: processes(c) for c in containers}
    time.sleep(2)
    for container in containers:
        name = stack.inspect(container)["Name"]
        assert first[container], name
        other = first[container] & processes(container)
        other = [p for p in other if p[0] != SERVICE_UID]
        assert not other, f"{name}: processes not run by uid {SERVICE_UID}: {other}"


def lpt_containers(stack: Stack) -> list[str]:
    postgres = set(stack.containers("postgres"))
    return [c for c in stack.containers() if c not in postgres]


# ---------------------------------------------------------------- the tests

def test_the_stack_is_locked_down(stack):
    """Two workers joined a head without CPUs; MLflow and the dashboard refuse requests without
    the login or the token; no secret in `docker inspect`; no service process as root."""
    nodes = stack.nodes()
    assert sorted(n["cpu"] for n in nodes if n["alive"]) == [0.0] + [1.0] * WORKERS
    assert len(stack.worker_nodes()) == WORKERS
    mlflow = f"http://127.0.0.1:{stack.mlflow_port}"
    assert mlflow_login_statuses(mlflow, mlflow_login(stack.secrets)) == MLFLOW_LOGIN_EXPECTED
    dashboard = f"http://127.0.0.1:{stack.dashboard_port}"
    assert dashboard_token_statuses(dashboard, stack.secrets["ray_auth_token"]) == DASHBOARD_TOKEN_EXPECTED
    assert_no_secret_in_inspect(stack, stack.containers())
    assert_service_user(stack, lpt_containers(stack))
    worker = stack.inspect(stack.containers("ray-worker")[0])
    print(f"[docker test] docker inspect {worker['Name']}: Env {json.dumps(worker['Config']['Env'])}; "
          f"secrets {[m['Destination'] for m in worker['Mounts'] if m['Type'] == 'bind']}", flush=True)


def trial_runs(client, parent_run_id: str | None = None):
    experiment = client.get_experiment_by_name("prompt_pool")
    if experiment is None:
        return []
    query = "tags.`lpt.role` = 'trial'" + (f" and tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else "")
    return client.search_runs([experiment.experiment_id], query, max_results=200)


def test_search_runs_on_both_workers_and_survives_losing_one(stack, tmp_path):
    """The driver container's 6-trial smoke search: trials on both worker containers; a worker
    container killed while it runs a trial; the search still ends with every trial done (completed
    or stopped early by ASHA, none failed; the killed one retried elsewhere), in the MLflow server.
    While it runs, the driver too holds no secret and runs as the user."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{stack.mlflow_port}")
    workers = stack.worker_nodes()
    log = tmp_path / "driver.log"
    started = time.time()
    with open(log, "w") as out:
        search = subprocess.Popen([*map(str, stack.compose), "run", "--rm", "-T", "driver", *SEARCH], cwd=stack.workdir,
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env={**os.environ, "DOCKER_BUILDKIT": "0"})
    try:
        seen, victim, deadline, checked = set(), None, time.time() + SEARCH_TIMEOUT_S, False
        while victim is None:
            assert time.time() < deadline, f"trials did not reach both workers in time:\n{log.read_text()[-4000:]}"
            assert search.poll() is None, f"the search ended before a worker could be killed:\n{log.read_text()[-6000:]}"
            time.sleep(1)
            if not checked and set(workers) <= seen:   # before a victim is picked: these take seconds
                assert stack.containers("driver"), "the driver container is not running"
                assert_no_secret_in_inspect(stack, stack.containers("driver"))
                assert_service_user(stack, lpt_containers(stack))   # the driver and the workers' trial processes too
                checked = True
            runs = trial_runs(client)
            seen |= {r.data.tags.get("lpt.node") for r in runs}
            # a trial with no epoch done yet still has the whole of phase 2 ahead: it cannot end before the kill
            fresh = [(r.data.tags.get("lpt.node"), r.info.run_id) for r in runs
                     if r.info.status == "RUNNING" and "val_acc" not in r.data.metrics]
            if checked and set(workers) <= seen and len([r for r in runs if r.info.status == "FINISHED"]) < TRIALS - 2:
                victim = next(((n, run_id) for n, run_id in fresh if n in workers), None)
        timed("search: until trials ran on both workers", started)
        victim, victim_run = victim
        killed = time.time()
        sh(["docker", "kill", workers[victim]], timeout=60)
        print(f"[docker test] killed worker container {workers[victim][:12]} (Ray node {victim[:12]}) "
              f"{killed - started:.0f} s into the search, while it ran the trial of run {victim_run[:12]}", flush=True)
        search.wait(timeout=max(60, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the search did not finish within {SEARCH_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")
    finally:
        if search.poll() is None:
            search.kill()
            search.wait(timeout=60)
    timed("search: after the kill", killed)
    timed("search: whole", started)
    output = log.read_text()
    assert search.returncode == 0, f"the search failed ({search.returncode}):\n{output[-6000:]}"

    # every trial completed (trials.parquet on the shared volume), each one a finished MLflow run
    head = stack.containers("ray-head")[0]
    table = stack.exec_as_user(head, "python", "-c", (
        "import glob, json, pyarrow.parquet as pq; "
        "[folder] = glob.glob('/shared/runs/prompt_pool-smoke-*'); "
        "print(json.dumps([folder, pq.read_table(folder + '/trials.parquet').to_pylist()], default=str))")).stdout
    folder, rows = json.loads(table.strip().splitlines()[-1])
    record = json.loads(stack.exec_as_user(head, "cat", f"{folder}/search.json").stdout)
    assert len(rows) == TRIALS and len({r["trial_id"] for r in rows}) == TRIALS
    statuses = [r["status"] for r in rows]   # ASHA may stop some early; none failed
    assert set(statuses) <= {"completed", "early_stopped"} and "completed" in statuses, rows
    runs = trial_runs(client, record["parent_run_id"])
    assert len(runs) == TRIALS and {r.info.run_id for r in runs} == {r["mlflow_run_id"] for r in rows}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert set(workers) <= seen, f"trial nodes {seen}, workers {set(workers)}"
    finished_after = {r.data.tags.get("lpt.node") for r in runs if r.info.end_time / 1000 > killed}
    assert finished_after and victim not in finished_after, f"trials finished after the kill on {finished_after}"
    retried = client.get_run(victim_run)   # the killed worker's trial, retried elsewhere in the same run
    assert retried.info.status == "FINISHED" and retried.data.tags["lpt.node"] != victim

    # the search's Optuna study is in the stack's PostgreSQL, where optuna.load_study finds it
    tags = client.get_run(record["parent_run_id"]).data.tags
    assert tags["lpt.optuna_storage"].startswith("postgresql+psycopg2://mlflow@postgres:5432/mlflow?")
    loaded = subprocess.run([*map(str, stack.compose), "run", "--rm", "-T", "--entrypoint", "lpt-entrypoint", "driver",
                             "python", "-c", "import json, optuna, sys; s = optuna.load_study(study_name=sys.argv[1], "
                             "storage=sys.argv[2]); print(json.dumps({t.user_attrs['trial_id']: t.state.name "
                             "for t in s.trials}))", tags["lpt.optuna_study"], tags["lpt.optuna_storage"]],
                            cwd=stack.workdir, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    states = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert states == {r["trial_id"]: {"completed": "COMPLETE", "early_stopped": "PRUNED"}[r["status"]] for r in rows}
    print(f"[docker test] timings: {json.dumps(TIMINGS)}", flush=True)
