"""docker-compose.yml's stack built and run in Docker, as a user would.

Set-up: a Docker daemon (started here as root when none answers: scripts/system-deps.sh installs
docker.io, docker-compose, iptables and debootstrap), the base images (the digests
docker-compose.yml pins, pulled; or where no image registry can be reached, stand-ins built from a
Debian root filesystem, tests/docker/, given as PYTHON_IMAGE and POSTGRES_IMAGE), the project's
image (`docker build`; the daemon's layer cache makes a second run take minutes), then
`scripts/cluster-setup.sh` and `docker-compose up -d --scale ray-worker=2` in a folder of its own.

Checks:
- locked down: MLflow and the Ray dashboard refuse requests without the login or the token (401);
  no secret value in any container's `docker inspect`; every process of the project's containers
  runs as the image's user; PostgreSQL has one role per service and none is a superuser but the
  set-up's; the workers' MLflow user is no admin (the admin API refuses it); each container, the
  one-shot set-up steps too, mounts exactly the secrets cluster_fixtures.SECRETS gives it; every
  container restarts unless stopped (the one-shots never), rotates its logs and is capped;
  scripts/cluster-setup.sh prints the Python and Ray the head runs.
- no Ray node can open a TCP connection to PostgreSQL (its own compose network); the MLflow
  server's container can.
- a 10-trial smoke search from the driver container, then `run register`: a second driver's
  `--resume` of it is refused in one line; a backup is taken (the driver paused for it), then
  scripts/cluster-restore.sh and `cluster-setup.sh --rotate` are refused in one line naming the
  `run` driver container and the search's locks; a Ray task a worker places on the driver's node
  finds no readable database password and cannot open the search process's memory; trials run on
  both worker containers; a worker container is killed while it runs a trial, then the MLflow
  server is stopped (60 s) while a trial runs; then the ray-head container is killed while a trial
  runs: the driver ends non-zero with one line naming the lost head and nothing recorded is lost;
  the head is started again, the workers rejoin, and a `--resume` driver goes on, through
  PostgreSQL stopped (40 s) and frozen (SIGSTOP, 30 s), each while a trial runs (why not 120 s and
  60 s: docs/cluster.md section 5); five backups mid-search; the search ends 0 with every trial
  done once (trials.parquet, one MLflow run each with no epoch logged twice, the Optuna study) and
  the model registered (by the register service) with no code or pickle file in it.
- scripts/cluster-backup.sh, `docker-compose down -v` (the volumes gone), `up` with new secrets,
  then scripts/cluster-restore.sh of each of the five mid-search backups one after another (the
  Optuna study it brings back has ended exactly the trials its trials.parquet holds), then of the
  last backup: the parent run, its trials, the registered model, the Optuna study and the search
  folder are back; the read-only optuna-dashboard shows the study and cannot delete it.
- scripts/cluster-setup.sh --rotate of four passwords (the registrar's among them): the new ones
  log in, the old ones do not, and the search is still there.
Everything is torn down (`down -v`); the images and the build cache stay.

Slow: about 10 minutes for the first build on two cores (torch's CUDA wheels), a few minutes
after that. Skips with the reason where no daemon can be started (not root, no docker).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cluster_fixtures import (
    COMPOSE_FILE,
    DASHBOARD_TOKEN_EXPECTED,
    LIST_NODES,
    MLFLOW_LOGIN_EXPECTED,
    ROOT,
    SECRETS,
    basic_auth,
    cluster_setup,
    dashboard_token_statuses,
    free_port,
    http_status,
    load_compose,
    login_to_mlflow,
    mlflow_login,
    mlflow_login_statuses,
    read_secrets,
    wait_http,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # every wait inside has its own limit

IMAGE = "lpt-studies:test"
BASE_IMAGES = {"PYTHON_IMAGE": "python", "POSTGRES_IMAGE": "postgres"}  # variable: its stand-in's tests/docker/<folder>
DEBIAN = "local/debian:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SERVICE_UID = 10001
WORKERS = 2
TRIALS = 10  # enough for the kills, the outages and the backups to land while trials run, in both drivers
EPOCHS = 3
PG_STOP_S, PG_FREEZE_S, MLFLOW_STOP_S = 40, 30, 60  # each outage as long as proves its point
SEARCH = (
    "python",
    "tune/search.py",
    "--study",
    "prompt_pool",
    "--profile",
    "smoke",
    "--trials",
    str(TRIALS),
    "--set",
    "phase1.epochs=1",
    "--set",
    f"phase2.epochs={EPOCHS}",
    "--storage",
    "/shared/runs",
)
SETUP = ("db-setup", "mlflow-setup")  # one-shot services
SEARCH_TIMEOUT_S = 1500
HEAD_LOSS_WAIT_S = 240  # the driver's Ray gives the lost head (GCS) 60 s to come back, then ends
TIMINGS: dict[str, float] = {}


def sh(argv: list[str], timeout: float, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
        **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"`{' '.join(map(str, argv[:6]))} ...` failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
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
        pytest.skip(
            f"{' and '.join(missing)} not installed: `apt-get install docker.io docker-compose iptables "
            "debootstrap` (scripts/system-deps.sh does it when run as root)"
        )
    if daemon_answers():
        yield
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("no Docker daemon answers, and starting one needs root and dockerd (Debian's docker.io)")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            ["dockerd"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        deadline = time.time() + 90
        while not daemon_answers():
            if daemon.poll() is not None or time.time() > deadline:
                pytest.fail(f"dockerd did not start ({daemon.poll()}):\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(1)
        yield
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)  # dockerd stops its containerd and containers
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
        pytest.skip(
            f"the base images {list(BASE_IMAGES)} are missing and cannot be pulled, and debootstrap (to build "
            "stand-ins) is not installed: `apt-get install debootstrap`"
        )
    rootfs = workdir / "rootfs"
    try:
        sh(["debootstrap", "--variant=minbase", "bookworm", rootfs, DEBIAN_MIRROR], timeout=900)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "-", DEBIAN], stdin=tar.stdout, capture_output=True, text=True, timeout=600
        )
        tar.stdout.close()
        assert tar.wait(timeout=60) == 0 and imported.returncode == 0, imported.stderr
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def pinned_images() -> dict[str, str]:
    """The base images docker-compose.yml pins by digest, by the variable that overrides each."""
    services = load_compose({})["services"]
    return {
        "PYTHON_IMAGE": services["mlflow"]["build"]["args"]["PYTHON_IMAGE"],
        "POSTGRES_IMAGE": services["postgres"]["image"],
    }


@pytest.fixture(scope="module")
def base_images(engine, tmp_path_factory) -> dict[str, str]:
    """{PYTHON_IMAGE: image, POSTGRES_IMAGE: image}: the pinned digests, present or pulled, else
    stand-ins built here (the daemon's layer cache makes a rebuild take seconds)."""
    started = time.time()
    workdir = tmp_path_factory.mktemp("base-images")
    chosen = {}
    for variable, pinned in pinned_images().items():
        try:
            if image_exists(pinned) or sh(["docker", "pull", "-q", pinned], timeout=120, check=False).returncode == 0:
                chosen[variable] = pinned
                continue
        except subprocess.TimeoutExpired:
            pass
        folder = BASE_IMAGES[variable]
        debian_image(workdir)
        context = workdir / folder
        shutil.copytree(ROOT / "tests" / "docker" / folder, context)
        ca = Path("/etc/ssl/certs/ca-certificates.crt")  # pip in the image trusts what the host trusts
        (context / "ca-certificates.crt").write_bytes(ca.read_bytes() if ca.exists() else b"")
        chosen[variable] = f"lpt-standin/{folder}:test"
        sh(["docker", "build", "-q", "-t", chosen[variable], context], timeout=900)
    timed("base images", started)
    print(f"[docker test] base images: {chosen}", flush=True)
    return chosen


@pytest.fixture(scope="module")
def image(base_images):
    """The project's image, built like `docker compose build` does (the layer cache kept)."""
    started = time.time()
    sh(
        ["docker", "build", "--build-arg", f"PYTHON_IMAGE={base_images['PYTHON_IMAGE']}", "-t", IMAGE, ROOT],
        timeout=1800,
    )
    timed("image build", started)
    size = sh(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE], timeout=60).stdout.strip()
    print(f"[docker test] image {IMAGE}: {int(size) / 1e9:.1f} GB", flush=True)
    return IMAGE


# ---------------------------------------------------------------- the stack


class Stack:
    def __init__(self, workdir: Path, image_name: str, base_images: dict[str, str]):
        self.workdir = workdir
        shutil.copy(COMPOSE_FILE, workdir / "docker-compose.yml")
        _, self.secrets = cluster_setup(workdir)
        self.mlflow_port, self.dashboard_port, self.optuna_port = free_port(), free_port(), free_port()
        settings = {
            "LPT_IMAGE": image_name,
            "RAY_WORKER_CPUS": "1",
            "MLFLOW_WORKERS": "1",
            "RAY_SHM_SIZE": "1gb",
            "MLFLOW_PORT": self.mlflow_port,
            "RAY_DASHBOARD_PORT": self.dashboard_port,
            "OPTUNA_DASHBOARD_PORT": self.optuna_port,
            **base_images,
        }
        with open(workdir / ".env", "a") as env:
            env.writelines(f"{k}={v}\n" for k, v in settings.items())
        (workdir / "data").mkdir(mode=0o755)
        self.project = f"lpttest{os.getpid()}"
        self.compose = [
            "docker-compose",
            "-p",
            self.project,
            "--project-directory",
            workdir,
            "-f",
            workdir / "docker-compose.yml",
        ]

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return sh([*self.compose, *args], timeout=timeout, check=check, cwd=self.workdir)

    def script_proc(self, name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """scripts/NAME ARGS... for this stack's folder, as a user runs it there."""
        env = {**os.environ, "COMPOSE": "docker-compose", "COMPOSE_PROJECT_NAME": self.project}
        return subprocess.run(
            ["bash", str(ROOT / "scripts" / name), *args, str(self.workdir)],
            cwd=self.workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def script(self, name: str, *args: str, timeout: float = 600) -> str:
        """scripts/NAME ARGS... for this stack's folder; its output (it must end 0)."""
        proc = self.script_proc(name, *args, timeout=timeout)
        assert proc.returncode == 0, (
            f"scripts/{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        return proc.stdout

    def service_of(self, container: str) -> str:
        return self.inspect(container)["Config"]["Labels"]["com.docker.compose.service"]

    def passes_check(self, service: str) -> bool:
        """The service's health check, run now in its container (Docker runs it every `interval`,
        10 s: a service back between two of its runs is seen at once)."""
        ids = self.containers(service)
        if not ids:
            return False
        test = self.inspect(ids[0])["Config"].get("Healthcheck", {}).get("Test") or []
        argv = {"CMD": test[1:], "CMD-SHELL": ["sh", "-c", *test[1:2]]}.get(test[0] if test else "")
        return bool(argv) and sh(["docker", "exec", ids[0], *argv], timeout=60, check=False).returncode == 0

    def wait_healthy(self, services: tuple[str, ...], timeout_s: float = 300) -> None:
        deadline = time.time() + timeout_s
        while any(self.health(s) != "healthy" and not self.passes_check(s) for s in services):
            assert time.time() < deadline, f"{services} not healthy after {timeout_s:.0f} s:\n{self.logs()}"
            time.sleep(2)

    def wait_setup(self, timeout_s: float = 300) -> None:
        """Until the one-shot set-up containers `up` started have ended, each with 0."""
        deadline = time.time() + timeout_s
        while True:
            states = {
                self.service_of(c): self.inspect(c)["State"] for s in SETUP for c in self.containers(s, every=True)
            }
            if all(state["Status"] == "exited" for state in states.values()):
                assert {s: state["ExitCode"] for s, state in states.items()} == dict.fromkeys(states, 0), self.logs()
                return
            assert time.time() < deadline, f"the set-up steps did not end in {timeout_s:.0f} s:\n{self.logs()}"
            time.sleep(1)

    def psql(self, query: str, database: str = "mlflow") -> list[list[str]]:
        """Rows of a query as PostgreSQL's superuser, inside its container (local socket)."""
        out = sh(
            [
                "docker",
                "exec",
                self.containers("postgres")[0],
                "psql",
                "-U",
                "postgres",
                "-d",
                database,
                "-At",
                "-F",
                "|",
                "-c",
                query,
            ],
            timeout=60,
        ).stdout
        return [line.split("|") for line in out.splitlines() if line]

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
        out = self.exec_as_user(
            head, "python", "-c", LIST_NODES, "127.0.0.1:6379", str(alive), str(timeout_s), timeout=timeout_s + 90
        ).stdout
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
def stack(image, base_images, tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("docker-stack"), image, base_images)
    login = login_to_mlflow(stack.secrets)  # this process reads the MLflow server as the driver does
    login.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{stack.mlflow_port}")  # MLflow's own inner clients too
    import mlflow

    mlflow.set_tracking_uri(None)  # a process-global URI an earlier test module set would win over the environment
    started = time.time()
    try:
        stack.run("up", "-d", "--no-build", "--scale", f"ray-worker={WORKERS}", timeout=600)
        stack.wait_healthy(("postgres", "mlflow", "ray-head"))
        stack.wait_setup()
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
    """Every password, key and token the secret files hold."""
    values = [
        secrets[n] for n in ("ray_auth_token", "postgres_password", "mlflow_admin_password", "mlflow_flask_secret_key")
    ]
    values += [secrets[n].rsplit(":", 1)[1] for n in ("mlflow_pgpass", "optuna_pgpass", "optuna_reader_pgpass")]
    return values + [mlflow_login(secrets)["MLFLOW_TRACKING_PASSWORD"]]


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


def mounted_secrets(stack: Stack, container: str) -> set[str]:
    return {
        Path(m["Destination"]).name
        for m in stack.inspect(container)["Mounts"]
        if m["Destination"].startswith("/run/secrets/")
    }


# ---------------------------------------------------------------- the tests


def test_the_stack_is_locked_down(stack):
    """Two workers joined a head without CPUs; MLflow and the dashboard refuse requests without
    the login or the token; no secret in `docker inspect`; no service process as root; one
    PostgreSQL role per service, none a superuser but the set-up's; the workers' MLflow user is no
    admin; each container mounts only its secrets; restart policies, log rotation and caps."""
    nodes = stack.nodes()
    assert sorted(n["cpu"] for n in nodes if n["alive"]) == [0.0] + [1.0] * WORKERS
    assert len(stack.worker_nodes()) == WORKERS
    mlflow = f"http://127.0.0.1:{stack.mlflow_port}"
    assert mlflow_login_statuses(mlflow, mlflow_login(stack.secrets)) == MLFLOW_LOGIN_EXPECTED
    dashboard = f"http://127.0.0.1:{stack.dashboard_port}"
    assert dashboard_token_statuses(dashboard, stack.secrets["ray_auth_token"]) == DASHBOARD_TOKEN_EXPECTED
    every = stack.containers(every=True)  # the ended set-up steps too
    assert_no_secret_in_inspect(stack, every)
    assert_service_user(stack, lpt_containers(stack))

    # PostgreSQL: the superuser is the set-up's; each service connects as its own role
    roles = {
        name: flag == "t"
        for name, flag in stack.psql("SELECT rolname, rolsuper FROM pg_roles WHERE rolname !~ '^pg_' ORDER BY 1")
    }
    assert roles == {
        "mlflow": False,
        "mlflow_owner": False,  # NOLOGIN: owns the database (issue 28)
        "optuna": False,
        "optuna_reader": False,
        "postgres": True,
    }, roles
    du = sh(
        ["docker", "exec", stack.containers("postgres")[0], "psql", "-U", "postgres", "-d", "mlflow", "-c", r"\du"],
        timeout=60,
    ).stdout
    print(f"[docker test] psql \\du:\n{du}", flush=True)
    owners = dict(
        stack.psql(
            "SELECT nspname, pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'optuna' "
            "UNION ALL SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mlflow'"
        )
    )
    assert owners == {"optuna": "optuna", "mlflow": "mlflow_owner"}

    # MLflow: the workers' and the driver's user is no admin; the admin API refuses it
    searcher = mlflow_login(stack.secrets)
    assert searcher["MLFLOW_TRACKING_USERNAME"] == "searcher"
    with urllib.request.urlopen(
        urllib.request.Request(
            f"{mlflow}/api/2.0/mlflow/users/get?username=searcher",
            headers=basic_auth("admin", stack.secrets["mlflow_admin_password"]),
        ),
        timeout=60,
    ) as resp:
        assert json.loads(resp.read())["user"]["is_admin"] is False
    as_searcher = basic_auth(searcher["MLFLOW_TRACKING_USERNAME"], searcher["MLFLOW_TRACKING_PASSWORD"])
    assert http_status(f"{mlflow}/api/2.0/mlflow/users/get?username=admin", as_searcher) == 403

    # each container: the secrets of its service, no more (bind mounts under /run/secrets, and
    # what the entrypoint installed for the service user)
    seen = set()
    for container in every:
        service, info = stack.service_of(container), stack.inspect(container)
        seen.add(service)
        assert mounted_secrets(stack, container) == SECRETS[service], service
        if info["State"]["Running"] and service != "postgres":
            listed = stack.exec_as_user(container, "ls", "/run/lpt-secrets").stdout.split()
            assert set(listed) == SECRETS[service], service
        host = info["HostConfig"]
        assert host["RestartPolicy"]["Name"] == ("no" if service in SETUP else "unless-stopped"), service
        assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "5", "max-size": "20m"}}, service
        assert host["Memory"] > 0 and host["PidsLimit"] > 0, service
        print(
            f"[docker test] {info['Name']}: secrets {sorted(SECRETS[service])}, restart "
            f"{host['RestartPolicy']['Name']}, memory {host['Memory'] / 2**30:g} GiB, pids {host['PidsLimit']}",
            flush=True,
        )
    assert seen == {"postgres", "db-setup", "mlflow", "mlflow-setup", "ray-head", "ray-worker"}
    # the versions cluster-setup.sh prints are those the stack runs
    head = stack.exec_as_user(
        stack.containers("ray-head")[0],
        "python",
        "-c",
        "import platform, ray; print(platform.python_version(), ray.__version__)",
    ).stdout.split()
    versions = stack.script("cluster-setup.sh").strip().splitlines()[-1]
    assert versions == f"versions (image {IMAGE}): Python {head[-2]}, Ray {head[-1]}", versions
    print(f"[docker test] cluster-setup.sh: {versions}", flush=True)
    worker = stack.inspect(stack.containers("ray-worker")[0])
    print(
        f"[docker test] docker inspect {worker['Name']}: Env {json.dumps(worker['Config']['Env'])}; "
        f"secrets {[m['Destination'] for m in worker['Mounts'] if m['Type'] == 'bind']}",
        flush=True,
    )


def test_a_worker_cannot_open_a_connection_to_postgresql(stack):
    """The Ray nodes are not on PostgreSQL's network: from a worker container, postgres:5432 does
    not resolve and PostgreSQL's address on its network does not answer; from the MLflow server's
    container (on both networks) the same probe connects."""
    postgres = stack.containers("postgres")[0]
    hosts = ("postgres", address_on(stack, postgres, "database"))
    seen = {}
    for service in ("ray-worker", "ray-head", "mlflow"):
        out = stack.exec_as_user(stack.containers(service)[0], "python", "-c", TCP_PROBE, *hosts, timeout=60).stdout
        seen[service] = dict(line.split() for line in out.splitlines() if line.strip())
    print(f"[docker test] TCP to PostgreSQL's port 5432: {seen}", flush=True)
    assert seen["mlflow"] == dict.fromkeys(hosts, "open")  # the probe can succeed
    for service in ("ray-worker", "ray-head"):
        assert "open" not in seen[service].values() and set(seen[service]) == set(hosts), (service, seen)


def trial_runs(client, parent_run_id: str | None = None):
    experiment = client.get_experiment_by_name("prompt_pool")
    if experiment is None:
        return []
    query = "tags.`lpt.role` = 'trial'" + (
        f" and tags.`mlflow.parentRunId` = '{parent_run_id}'" if parent_run_id else ""
    )
    return client.search_runs([experiment.experiment_id], query, max_results=200)


def study_runs(client):
    experiment = client.get_experiment_by_name("prompt_pool")
    return client.search_runs([experiment.experiment_id], "tags.`lpt.role` = 'study'") if experiment else []


def load_optuna_study(stack: Stack, tags: dict) -> dict:
    """{Ray trial id: Optuna state} of the search's study, read in a driver container."""
    loaded = sh(
        [
            *stack.compose,
            "run",
            "--rm",
            "-T",
            "--no-deps",
            "--entrypoint",
            "lpt-entrypoint",
            "driver",
            "python",
            "-c",
            "import json, optuna, sys; s = optuna.load_study(study_name=sys.argv[1], "
            "storage=sys.argv[2]); print(json.dumps({t.user_attrs['trial_id']: t.state.name for t in s.trials}))",
            tags["lpt.optuna_study"],
            tags["lpt.optuna_storage"],
        ],
        timeout=300,
        cwd=stack.workdir,
    )
    return json.loads(loaded.stdout.strip().splitlines()[-1])


def search_table(stack: Stack) -> tuple[str, list[dict], dict]:
    """The search folder on the shared volume, its trials.parquet rows and its search.json."""
    head = stack.containers("ray-head")[0]
    out = stack.exec_as_user(
        head,
        "python",
        "-c",
        (
            "import glob, json, pyarrow.parquet as pq; "
            "[folder] = glob.glob('/shared/runs/prompt_pool-smoke-*'); "
            "print(json.dumps([folder, pq.read_table(folder + '/trials.parquet').to_pylist(), "
            "json.load(open(folder + '/search.json'))], default=str))"
        ),
    ).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


# Run in a worker container as a Ray token holder: a task placed on the driver's node (argv[1]),
# looking for what a task there can read: the secret copies, every process's environment, a
# pgpass file, and whether the search process's memory opens.
RAY_PROBE = r"""
import glob, json, os, socket, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

@ray.remote(num_cpus=0)
def look():
    found, search = {}, {}
    paths = glob.glob("/run/lpt-secrets/*") + glob.glob("/run/secrets/*") + glob.glob("/proc/*/environ")
    for path in paths + [os.path.expanduser("~/.pgpass")]:
        try:
            with open(path, "rb") as f:
                found[path] = f.read().decode(errors="replace")
        except OSError:
            pass
    for path in glob.glob("/proc/*/cmdline"):
        try:
            with open(path, "rb") as f:
                argv = f.read().split(b"\0")
            if argv[1:2] != [b"scripts/hold_db_password.py"]:  # the search process (its parents show it too)
                continue
            pid = path.split("/")[2]
            open(f"/proc/{pid}/mem", "rb").close()
            search[pid] = "readable"
        except OSError as exc:
            search[path.split("/")[2]] = type(exc).__name__
    node = ray.get_runtime_context().get_node_id()
    return {"node": node, "host": socket.gethostname(), "files": found, "search": search}

ray.init(address="ray-head:6379", logging_level="ERROR", log_to_driver=False)
ref = look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(sys.argv[1], soft=False)).remote()
print(json.dumps(ray.get(ref, timeout=120)))
"""

# A TCP connection to port 5432 of each host in argv: "open" or the error's name.
TCP_PROBE = """
import socket, sys
for host in sys.argv[1:]:
    try:
        socket.create_connection((host, 5432), timeout=5).close()
        print(host, "open")
    except OSError as exc:
        print(host, type(exc).__name__)
"""


def database_passwords(secrets: dict) -> list[str]:
    return [secrets["postgres_password"]] + [
        secrets[n].rsplit(":", 1)[1] for n in ("mlflow_pgpass", "optuna_pgpass", "optuna_reader_pgpass")
    ]


def address_on(stack: Stack, container: str, network: str) -> str:
    return stack.inspect(container)["NetworkSettings"]["Networks"][f"{stack.project}_{network}"]["IPAddress"]


@pytest.fixture(scope="module")
def search(stack, tmp_path_factory):
    """The driver container's 10-trial smoke search (then the register service), and what it
    lives through: a second driver's --resume of it (refused); a backup (the driver paused for it),
    then restore and --rotate (refused); a Ray task placed on the driver's node looking for
    secrets; a worker container killed while it runs a trial with no epoch done (it cannot end
    before the kill); the MLflow server stopped while a trial runs; the ray-head container killed
    while a trial runs (the driver ends), started again, and a `--resume` driver that lives
    through PostgreSQL stopped and frozen (SIGSTOP), each while a trial runs; five backups
    mid-search. Returns what happened, for the tests to check."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{stack.mlflow_port}")
    workers = stack.worker_nodes()
    log = tmp_path_factory.mktemp("search") / "driver.log"
    happened = {"workers": workers, "restarted": {}, "backups": []}
    started = time.time()
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [*map(str, stack.compose), "run", "--rm", "-T", "driver", *SEARCH],
            cwd=stack.workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )

    def running(what: str) -> None:
        assert driver.poll() is None, f"the search ended before {what}:\n{log.read_text()[-6000:]}"

    def backup(label: str) -> None:
        """cluster-backup.sh while the search runs (its driver paused for the dump and the copy)."""
        if driver.poll() is not None:  # the driver of the moment: the first, then the --resume one
            return
        at = time.time()
        proc = stack.script_proc("cluster-backup.sh", timeout=300)
        assert proc.returncode == 0, f"backup {label} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        path = re.search(r"^backup: (\S+) \(", proc.stdout, re.M).group(1)
        happened["backups"].append((label, path))
        timed(f"backup {label}", at)
        print(f"[docker test] backup {label}: {proc.stdout.strip()}", flush=True)

    deadline = time.time() + SEARCH_TIMEOUT_S
    try:
        # 1. once the search holds its folder (its parent run exists), a second driver of it is refused
        while not study_runs(client):
            assert time.time() < deadline, f"the search made no parent run in time:\n{log.read_text()[-4000:]}"
            running("its parent run appeared")
            time.sleep(1)
        happened["resume"] = stack.run(
            "run", "--rm", "-T", "--no-deps", "driver", *SEARCH, "--resume", timeout=300, check=False
        )
        running("the second driver was refused")
        timed("search: a second driver refused", started)

        # 1b. a backup mid-search; restore (of it) and --rotate refused while the driver runs
        backup("at the start")
        happened["refused"] = {
            "restore": stack.script_proc("cluster-restore.sh", happened["backups"][0][1], timeout=300),
            "--rotate": stack.script_proc("cluster-setup.sh", "--rotate", "postgres_password", timeout=300),
        }
        running("restore and --rotate were refused")
        for action, proc in happened["refused"].items():
            print(f"[docker test] {action} while the search runs: {proc.returncode} {proc.stderr.strip()}", flush=True)

        # 1c. a Ray token holder's task on the driver's node: what it can read there
        driver_container = stack.containers("driver")[0]
        driver_ip = address_on(stack, driver_container, "default")
        [driver_node] = [n["node_id"] for n in stack.nodes() if n["alive"] and n["ip"] == driver_ip]
        probe = stack.exec_as_user(stack.containers("ray-worker")[0], "python", "-c", RAY_PROBE, driver_node)
        happened["probe"] = {**json.loads(probe.stdout.strip().splitlines()[-1]), "driver_node": driver_node}
        print(
            f"[docker test] a Ray task on the driver's node {driver_node[:12]}: host {happened['probe']['host']}, "
            f"read {sorted(happened['probe']['files'])}, the search process {happened['probe']['search']}",
            flush=True,
        )
        happened["driver_container"] = driver_container
        running("the Ray task looked for secrets")

        # 2. trials on both workers; the checks; a worker killed while it runs a fresh trial
        seen, victim, checked = set(), None, False
        while victim is None:
            assert time.time() < deadline, f"trials did not reach both workers in time:\n{log.read_text()[-4000:]}"
            running("a worker could be killed")
            time.sleep(1)
            if not checked and set(workers) <= seen:  # before a victim is picked: these take seconds
                assert stack.containers("driver"), "the driver container is not running"
                assert_no_secret_in_inspect(stack, stack.containers("driver"))
                assert_service_user(stack, lpt_containers(stack))  # the driver and the workers' trial processes too
                driver_container = stack.containers("driver")[0]
                assert mounted_secrets(stack, driver_container) == SECRETS["driver"]
                checked = True
            runs = trial_runs(client)
            seen |= {r.data.tags.get("lpt.node") for r in runs}
            # a trial with no epoch done yet still has the whole of phase 2 ahead: it cannot end before the kill
            fresh = [
                (r.data.tags.get("lpt.node"), r.info.run_id)
                for r in runs
                if r.info.status == "RUNNING" and "val_acc" not in r.data.metrics
            ]
            if checked and set(workers) <= seen and len([r for r in runs if r.info.status == "FINISHED"]) < TRIALS - 2:
                victim = next(((n, run_id) for n, run_id in fresh if n in workers), None)
        timed("search: until trials ran on both workers", started)
        happened["seen"] = seen
        happened["victim"], happened["victim_run"] = victim
        happened["killed"] = time.time()
        sh(["docker", "kill", workers[victim[0]]], timeout=60)
        print(
            f"[docker test] killed worker container {workers[victim[0]][:12]} (Ray node {victim[0][:12]}) "
            f"{happened['killed'] - started:.0f} s into the search, while it ran the trial of run {victim[1][:12]}",
            flush=True,
        )

        backup("after the kill")

        # 3. the outages, each while a trial runs (the remaining worker runs the rest of the budget
        # one trial at a time): the MLflow server stopped (a trial with most of its epochs ahead);
        # then the Ray head killed (4.); then, in the resumed search, PostgreSQL stopped and frozen
        # (its postmaster, PID 1: no new connection is accepted); a backup after each but the stop
        def trials_running(fresh: bool, since: float) -> set[str]:
            """The runs of trials that run and have epochs ahead: RUNNING in MLflow (a trial whose
            last epoch is logged is RUNNING until the driver closes it) with fewer than EPOCHS
            epochs logged (``fresh``: fewer than EPOCHS - 1, most of them ahead), the last after
            ``since`` (a trial the head's kill left RUNNING counts once its resumed trial logs again)."""
            found = set()
            for r in trial_runs(client):
                if r.info.status != "RUNNING":
                    continue
                epochs = client.get_metric_history(r.info.run_id, "val_acc")
                ahead = len(epochs) < (EPOCHS - 1 if fresh else EPOCHS)
                if ahead and (not since or max((m.timestamp for m in epochs), default=0) > since * 1000):
                    found.add(r.info.run_id)
            return found

        def outage(name: str, service: str, seconds: float, fresh: bool, since: float = 0.0) -> None:
            while not (during := trials_running(fresh, since)):
                assert time.time() < deadline, f"no trial ran for {name}:\n{log.read_text()[-4000:]}"
                running(f"{name} could begin")
                time.sleep(1)
            running(f"{name} began")
            container = stack.containers(service)[0]
            happened["restarted"][name] = (time.time(), during)
            if name == "postgres frozen":
                sh(["docker", "kill", "--signal", "SIGSTOP", container], timeout=60)
                time.sleep(seconds)
                sh(["docker", "kill", "--signal", "SIGCONT", container], timeout=60)
            else:
                sh(["docker", "stop", "--time", "20", container], timeout=120)
                time.sleep(seconds)
                sh(["docker", "start", container], timeout=120)
            print(
                f"[docker test] {name} for {seconds} s, {happened['restarted'][name][0] - started:.0f} s into "
                f"the search, while {len(during)} trial(s) ran",
                flush=True,
            )
            stack.wait_healthy((service,))
            if name != "postgres stopped":
                backup(f"after {name}")

        outage("mlflow stopped", "mlflow", MLFLOW_STOP_S, fresh=True)

        # 4. the Ray head killed while a trial runs: the driver ends non-zero with one line, and
        # what it recorded stays; the head started again, the worker rejoins (the kill ends its
        # Ray node; its restart policy starts it again), the one killed first is started again, and
        # `--resume` goes on with the search on both
        while not (during := {r.info.run_id for r in trial_runs(client) if r.info.status == "RUNNING"}):
            assert time.time() < deadline, f"no trial ran for the head's kill:\n{log.read_text()[-4000:]}"
            running("the head could be killed")
            time.sleep(1)
        head = stack.containers("ray-head")[0]
        recorded = recorded_state(stack, client)
        happened["head_killed"] = (time.time(), during)
        sh(["docker", "kill", head], timeout=60)
        print(
            f"[docker test] killed the ray-head container {head[:12]} {time.time() - started:.0f} s into the "
            f"search, while {len(during)} trial(s) ran; recorded then: {recorded_counts(recorded)}",
            flush=True,
        )
        at = time.time()
        try:
            driver.wait(timeout=HEAD_LOSS_WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the driver did not end {HEAD_LOSS_WAIT_S} s after the head's kill:\n{log.read_text()[-6000:]}"
            )
        happened["head_lost"] = (driver.returncode, log.read_text(), time.time() - at)
        timed("search: the driver ended after the head's kill", at)
        at = time.time()
        sh(["docker", "start", head], timeout=120)
        stack.wait_healthy(("ray-head",))
        sh(["docker", "start", workers[victim[0]]], timeout=120)  # the worker killed first, back for the rest
        happened["rejoined"] = stack.nodes(alive=1 + WORKERS, timeout_s=240)
        happened["after_head_loss"] = recorded_state(stack, client)
        happened["recorded_at_kill"] = recorded
        timed("search: the head back, the workers rejoined", at)
        print(
            f"[docker test] the head back: {sum(n['alive'] for n in happened['rejoined'])} Ray nodes alive; "
            f"recorded after the driver ended: {recorded_counts(happened['after_head_loss'])}",
            flush=True,
        )
        resumed_at = time.time()
        log = log.with_name("driver-resume.log")
        with open(log, "w") as out:
            driver = subprocess.Popen(
                [*map(str, stack.compose), "run", "--rm", "-T", "--no-deps", "driver", *SEARCH, "--resume"],
                cwd=stack.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "DOCKER_BUILDKIT": "0"},
            )
        # the resumed search: a backup once it trains again, then the PostgreSQL outages
        while not trials_running(False, resumed_at):
            assert time.time() < deadline, f"the resumed search trained no trial in time:\n{log.read_text()[-4000:]}"
            running("the resumed search trained")
            time.sleep(1)
        backup("in the resumed search")
        outage("postgres stopped", "postgres", PG_STOP_S, fresh=False, since=resumed_at)
        outage("postgres frozen", "postgres", PG_FREEZE_S, fresh=False, since=resumed_at)
        driver.wait(timeout=max(60, deadline - time.time()))
        timed("search: the --resume driver", resumed_at)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the search did not finish within {SEARCH_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=60)
    timed("search: after the kill", happened["killed"])
    timed("search: whole", started)
    happened["returncode"], happened["output"] = driver.returncode, log.read_text()
    # registration: the driver holds only searcher, so the one-shot register service (registrar)
    register = ("run", "--rm", "-T", "register", "--study", "prompt_pool")
    happened["register"] = stack.run(*register, timeout=600, check=False)
    return happened


# Optuna trials that have not ended: running, or queued (the baseline before its first ask; a trial
# asked for after Tune's last snapshot, queued again by --resume for the next ask)
UNENDED = ("RUNNING", "WAITING")


def live_optuna_states(stack: Stack, database: str = "mlflow") -> dict:
    """{Ray trial id: Optuna state} of the Optuna studies in a database of the stack's PostgreSQL."""
    rows = stack.psql(
        "SELECT a.value_json, t.state FROM optuna.trials t JOIN optuna.trial_user_attributes a "
        "ON a.trial_id = t.trial_id AND a.key = 'trial_id'",
        database=database,
    )
    return {json.loads(v): state for v, state in rows}


def recorded_state(stack: Stack, client) -> dict:
    """What the search has recorded: its trials.parquet rows, {run id: status} of its trial runs in
    MLflow and {Ray trial id: state} of its Optuna study."""
    folder, rows, record = search_table(stack)
    return {
        "rows": {r["trial_id"]: r for r in rows},
        "runs": {r.info.run_id: r.info.status for r in trial_runs(client, record["parent_run_id"])},
        "optuna": live_optuna_states(stack),
    }


def recorded_counts(recorded: dict) -> str:
    ended = [s for s in recorded["optuna"].values() if s not in UNENDED]
    finished = [s for s in recorded["runs"].values() if s == "FINISHED"]
    return (
        f"{len(recorded['rows'])} row(s) in trials.parquet, {len(recorded['runs'])} MLflow run(s) "
        f"({len(finished)} finished), {len(recorded['optuna'])} Optuna trial(s) ({len(ended)} ended)"
    )


def test_a_second_driver_of_a_running_search_is_refused(search):
    proc = search["resume"]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, f"{proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert re.fullmatch(
        r"error: --resume: prompt_pool-smoke-\d{8}-\d{6} is running \(pid \d+ on \S+ since [\d-]+ [\d:]+\): "
        r"a search runs in one driver at a time; .*",
        errors[0],
    ), errors
    print(f"[docker test] the second driver: {errors[0]}", flush=True)


def test_restore_and_rotate_are_refused_while_a_run_driver_is_live(search):
    """`docker compose run`'s driver container is found (by its labels), and the search's locks:
    restore and --rotate end 2 with one line naming them, and change nothing (the search ends 0)."""
    for action, proc in search["refused"].items():
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1, f"{action}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        line = errors[0]
        assert line.startswith(f"error: {action} refused: a search is running (driver container "), line
        assert f"({search['driver_container'][:12]})" in line, line
        assert re.search(r"the advisory lock \d+ held by pid \d+ on [0-9a-f]{12} since ", line), line
        assert re.search(r"/shared/runs/prompt_pool-smoke-\d{8}-\d{6}/search.lock held by pid \d+ on ", line), line
        assert line.endswith(f": {action} once it has ended"), line
        print(f"[docker test] {action} refused: {line}", flush=True)
    assert search["returncode"] == 0


def test_a_ray_task_on_the_drivers_node_finds_no_database_secret(stack, search):
    """A Ray token holder (a worker container) places a task on the driver's node: no file it can
    read there (the secret copies, the processes' environments, a pgpass) holds a password that
    opens PostgreSQL, and the search process's memory does not open (not dumpable)."""
    probe = search["probe"]
    assert probe["node"] == probe["driver_node"] and probe["host"] == search["driver_container"][:12], probe["host"]
    readable = probe["files"]
    assert "/run/lpt-secrets/ray_auth_token" in readable  # the task did read there: the Ray trust domain
    for password in database_passwords(stack.secrets):
        holding = [path for path, text in readable.items() if password in text]
        assert not holding, f"a database password is readable on the driver's node in {holding}"
    assert probe["search"] and "readable" not in probe["search"].values(), probe["search"]
    print(
        f"[docker test] a Ray task on the driver's node read {sorted(p for p in readable if '/proc/' not in p)} "
        f"and {sum('/proc/' in p for p in readable)} process environments; the search process: {probe['search']}",
        flush=True,
    )


def test_the_search_survives_a_lost_worker_and_restarts_of_postgres_and_mlflow(stack, search):
    """Every trial done once, in the table, in MLflow (no run twice, no epoch logged twice) and in
    the Optuna study; the trials that ran through the restarts finished; the model registered."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{stack.mlflow_port}")
    output = search["output"]
    assert search["returncode"] == 0, f"the search failed ({search['returncode']}):\n{output[-6000:]}"
    folder, rows, record = search_table(stack)
    assert len(rows) == TRIALS and len({r["trial_id"] for r in rows}) == TRIALS
    statuses = [r["status"] for r in rows]  # ASHA may stop some early; none failed
    assert set(statuses) <= {"completed", "early_stopped"} and "completed" in statuses, rows
    runs = trial_runs(client, record["parent_run_id"])
    assert len(runs) == TRIALS and {r.info.run_id for r in runs} == {r["mlflow_run_id"] for r in rows}
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:  # a request MLflow's client sent again after a restart did not log an epoch twice
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, len(steps) + 1)), (run.info.run_id, steps)
    workers, victim = search["workers"], search["victim"]
    assert set(workers) <= search["seen"], f"trial nodes {search['seen']}, workers {set(workers)}"
    # an epoch logged after the kill (the worker's own clock; a run's end time is the driver's, which
    # may close a trial that ended on the victim just before the kill a moment after it)
    last_epoch = {
        r.info.run_id: max((m.timestamp for m in client.get_metric_history(r.info.run_id, "val_acc")), default=0)
        for r in runs
    }
    trained_after = {r.data.tags.get("lpt.node") for r in runs if last_epoch[r.info.run_id] / 1000 > search["killed"]}
    assert trained_after and victim not in trained_after, f"epochs logged after the kill on {trained_after}"
    retried = client.get_run(search["victim_run"])  # the killed worker's trial, retried elsewhere in the same run
    assert retried.info.status == "FINISHED" and retried.data.tags["lpt.node"] != victim
    for service, (when, during) in search["restarted"].items():
        ended = {r.info.run_id for r in runs if r.info.end_time / 1000 > when}
        assert during and during <= ended, f"{service}: the trials running at its restart {during}, ended after {ended}"
    waited = "Optuna storage: the database is unreachable" in output
    print(
        f"[docker test] the driver's Optuna storage {'waited for' if waited else 'did not need to wait for'} "
        f"PostgreSQL",
        flush=True,
    )

    # the search's Optuna study is in the stack's PostgreSQL (the role optuna), where optuna.load_study finds it
    tags = client.get_run(record["parent_run_id"]).data.tags
    assert tags["lpt.optuna_storage"].startswith("postgresql+psycopg2://optuna@postgres:5432/mlflow?")
    states = load_optuna_study(stack, tags)
    assert states == optuna_states_of_table(rows)
    print(
        f"[docker test] the search (ended by its --resume driver, exit {search['returncode']}): "
        f"{len(rows)} trial(s) in trials.parquet {sorted(statuses)}, {len(runs)} MLflow run(s), "
        f"Optuna {sorted(states.values())}",
        flush=True,
    )

    # the register service: the best trial's model, data only, no code file, no pickle
    registered = search["register"]
    assert registered.returncode == 0, f"{registered.stdout[-3000:]}\n{registered.stderr[-3000:]}"
    model_uri = tags["lpt.model_uri"]
    assert re.fullmatch(r"models:/prompt_pool-smoke/\d+", model_uri) and f"model: {model_uri}" in registered.stdout
    version = client.get_model_version("prompt_pool-smoke", model_uri.rsplit("/", 1)[1])
    names = {a.path for a in client.list_artifacts(version.run_id, "model")}
    assert "model/data" in names and "model/MLmodel" in names, names
    assert not [n for n in names if n.endswith((".py", ".pkl", ".pickle"))], names
    print(f"[docker test] timings: {json.dumps(TIMINGS)}", flush=True)


def test_the_ray_head_killed_ends_the_driver_and_resume_completes_the_search(stack, search):
    """The ray-head container killed while a trial runs: the driver ends non-zero with one line
    naming the lost head, and nothing it recorded is lost (the trials.parquet rows, the MLflow
    trial runs, the Optuna study's ended trials); the head started again, the workers rejoin, and
    `--resume` completes the search: every trial once, its rows from before the kill unchanged (the
    MLflow and Optuna counts: test_the_search_survives_...)."""
    code, output, waited = search["head_lost"]
    tail = [line for line in output.splitlines() if line.strip()][-5:]
    print(f"[docker test] the driver after the head's kill: exit {code} after {waited:.0f} s; last lines:", flush=True)
    for line in tail:
        print(f"[docker test]   {line[:300]}", flush=True)
    assert code not in (0, None), f"the driver ended {code} without its head:\n{output[-4000:]}"
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: the Ray head ray-head:6379 has not answered for "), (
        f"{errors}\n{output[-4000:]}"
    )
    assert errors[0].endswith("then run the same command with --resume"), errors[0]
    before, after = search["recorded_at_kill"], search["after_head_loss"]
    print(
        f"[docker test] recorded at the head's kill: {recorded_counts(before)}; after the driver ended: "
        f"{recorded_counts(after)}",
        flush=True,
    )
    for trial_id, row in before["rows"].items():  # the rows written stay as they were
        assert after["rows"].get(trial_id) == row, (trial_id, row, after["rows"].get(trial_id))
    for run_id, status in before["runs"].items():  # every run stays, a finished one finished
        assert run_id in after["runs"] and (status != "FINISHED" or after["runs"][run_id] == "FINISHED"), run_id
    for trial_id, state in before["optuna"].items():  # an ended Optuna trial stays ended as it was
        assert state in UNENDED or after["optuna"].get(trial_id) == state, (trial_id, state, after["optuna"])
    # the worker the first kill left (its Ray node ended with the head's; its restart policy started it
    # again) and the one killed first (`docker start`) joined the new head
    assert sum(n["alive"] for n in search["rejoined"]) == 1 + WORKERS, search["rejoined"]
    assert search["returncode"] == 0, f"--resume failed ({search['returncode']}):\n{search['output'][-6000:]}"
    _, rows, _ = search_table(stack)
    assert len(rows) == TRIALS and len({r["trial_id"] for r in rows}) == TRIALS
    final = {r["trial_id"]: r for r in rows}
    for trial_id, row in after["rows"].items():  # --resume trained none of them again
        assert final[trial_id] == row, (trial_id, row, final[trial_id])


def optuna_states_of_table(rows: list[dict]) -> dict:
    """{Ray trial id: the Optuna state} trials.parquet's rows stand for."""
    return {r["trial_id"]: {"completed": "COMPLETE", "early_stopped": "PRUNED"}.get(r["status"], "FAIL") for r in rows}


def restored_table(stack: Stack) -> list[dict]:
    """The trials.parquet rows of the search folder on the shared volume (none before its first row)."""
    out = stack.exec_as_user(
        stack.containers("ray-head")[0],
        "python",
        "-c",
        "import glob, json, pyarrow.parquet as pq; "
        "tables = glob.glob('/shared/runs/prompt_pool-smoke-*/trials.parquet'); "
        "print(json.dumps(pq.read_table(tables[0]).to_pylist() if tables else [], default=str))",
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_backup_then_down_v_then_restore_brings_the_search_back(stack, search):
    """cluster-backup.sh after the search; `down -v` deletes the volumes; a fresh stack, with new
    secrets, is empty; cluster-restore.sh gives back the parent run, its trials, the registered model, the Optuna
    study and the search folder; the read-only optuna-dashboard shows the study, cannot delete it."""
    from mlflow import MlflowClient

    assert search["returncode"] == 0, "the search failed: nothing to back up"
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{stack.mlflow_port}")
    folder, rows, record = search_table(stack)
    parent = client.get_run(record["parent_run_id"])
    model_uri = parent.data.tags["lpt.model_uri"]
    started = time.time()
    out = stack.script("cluster-backup.sh")
    timed("backup", started)
    backup = Path(re.search(r"^backup: (\S+) \(", out, re.M).group(1))
    assert backup.is_file() and backup.parent == stack.workdir / "backups"
    print(f"[docker test] {out.strip()}; {backup.stat().st_size} bytes", flush=True)

    started = time.time()
    stack.run("down", "-v", "--timeout", "20", timeout=300)
    volumes = sh(
        ["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={stack.project}"], timeout=60
    ).stdout.split()
    assert not volumes, volumes
    # the fresh stack has other secrets: every one made anew (the restore must not need the old ones)
    old_secrets = stack.secrets
    shutil.rmtree(stack.workdir / "secrets")
    _, stack.secrets = cluster_setup(stack.workdir)
    assert all(
        stack.secrets[n] != old_secrets[n] for n in ("postgres_password", "optuna_pgpass", "mlflow_admin_password")
    )
    os.environ["MLFLOW_TRACKING_PASSWORD"] = mlflow_login(stack.secrets)[
        "MLFLOW_TRACKING_PASSWORD"
    ]  # undone at the end
    stack.run("up", "-d", "--no-build", "postgres", "mlflow", "ray-head", timeout=600)
    stack.wait_healthy(("postgres", "mlflow", "ray-head"))
    assert stack.psql("SELECT count(*) FROM runs") == [["0"]]  # a fresh database
    timed("down -v, up", started)

    # each backup taken mid-search (the driver paused for it), restored here one after another:
    # the Optuna study it brings back has ended exactly the trials its trials.parquet holds
    assert len(search["backups"]) == 5, f"only {[label for label, _ in search['backups']]} were taken mid-search"
    for label, path in search["backups"]:
        started = time.time()
        out = stack.script("cluster-restore.sh", path)
        timed(f"restore of the backup {label}", started)
        assert out.strip().splitlines()[-1].startswith(f"restored {path} into the stack in {stack.workdir}")
        then_rows, then_states = restored_table(stack), live_optuna_states(stack)
        ended = {t: state for t, state in then_states.items() if state not in UNENDED}
        print(
            f"[docker test] the backup {label}, restored: {len(then_rows)} trial(s) in trials.parquet, "
            f"Optuna {sorted(then_states.values())}",
            flush=True,
        )
        assert ended == optuna_states_of_table(then_rows), (label, ended, then_rows)

    started = time.time()
    out = stack.script("cluster-restore.sh", str(backup))
    timed("restore", started)
    assert out.strip().splitlines()[-1].startswith(f"restored {backup} into the stack in {stack.workdir}")

    # MLflow, as the searcher with this stack's password (mlflow-setup set it); the admin's is this stack's too
    admin = basic_auth("admin", stack.secrets["mlflow_admin_password"])
    assert http_status(f"http://127.0.0.1:{stack.mlflow_port}/api/2.0/mlflow/users/get?username=searcher", admin) == 200
    restored = client.get_run(record["parent_run_id"])
    assert restored.info.status == "FINISHED" and restored.data.tags == parent.data.tags
    runs = trial_runs(client, record["parent_run_id"])
    assert sorted(r.info.run_id for r in runs) == sorted(r["mlflow_run_id"] for r in rows)
    assert all(r.info.status == "FINISHED" and "val_acc" in r.data.metrics for r in runs)
    version = client.get_model_version("prompt_pool-smoke", model_uri.rsplit("/", 1)[1])
    assert version.tags["lpt.parent_run_id"] == record["parent_run_id"]
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(version.run_id, "model")}  # artifacts back
    # the search folder and the Optuna study
    assert search_table(stack) == (folder, rows, record)
    states = load_optuna_study(stack, parent.data.tags)
    assert states == optuna_states_of_table(rows)

    # the read-only optuna-dashboard: it lists the restored study; deleting it fails, and it stays
    started = time.time()
    sh(
        [*stack.compose, "--profile", "dashboard", "up", "-d", "--no-build", "optuna-dashboard"],
        timeout=300,
        cwd=stack.workdir,
    )
    dashboard = f"http://127.0.0.1:{stack.optuna_port}"
    wait_http(f"{dashboard}/api/studies", 180)
    studies = json.loads(urllib.request.urlopen(f"{dashboard}/api/studies", timeout=60).read())["study_summaries"]
    [study] = [s for s in studies if s["study_name"] == parent.data.tags["lpt.optuna_study"]]
    request = urllib.request.Request(f"{dashboard}/api/studies/{study['study_id']}", method="DELETE")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 500  # optuna_reader: permission denied
    assert load_optuna_study(stack, parent.data.tags) == states
    timed("optuna-dashboard", started)
    print(f"[docker test] timings: {json.dumps(TIMINGS)}", flush=True)


def test_rotating_secrets_keeps_the_data(stack, search):
    """scripts/cluster-setup.sh --rotate on the running stack: the superuser's, the role optuna's,
    the searcher's and the registrar's passwords change in place; the new ones log in, the old ones
    do not, and the search's runs and Optuna study are still there."""
    from mlflow import MlflowClient

    assert search["returncode"] == 0, "the search failed: nothing to keep"
    _, rows, record = search_table(stack)
    old = dict(stack.secrets)
    started = time.time()
    rotated = ("postgres_password", "optuna_pgpass", "mlflow_credentials", "mlflow_registrar_credentials")
    out = stack.script("cluster-setup.sh", "--rotate", ",".join(rotated))
    timed("rotate", started)
    assert [line for line in out.splitlines() if line.startswith("rotated ")] == [f"rotated {n}" for n in rotated]
    stack.secrets = read_secrets(stack.workdir / "secrets")
    changed = {n for n in old if old[n] != stack.secrets[n]}
    assert changed == set(rotated), changed
    assert not list((stack.workdir / "secrets").glob("*.new"))  # each staged file renamed over its secret

    pg = stack.containers("postgres")[0]
    logins = {
        which: sh(
            [
                "docker",
                "exec",
                "-e",
                f"PGPASSWORD={secrets['postgres_password']}",
                pg,
                "psql",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "mlflow",
                "-c",
                "SELECT 1",
            ],
            timeout=60,
            check=False,
        ).returncode
        for which, secrets in (("old", old), ("new", stack.secrets))
    }
    assert logins == {"old": 2, "new": 0}, logins
    api = f"http://127.0.0.1:{stack.mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1"
    searcher = {
        which: http_status(api, basic_auth("searcher", mlflow_login(secrets)["MLFLOW_TRACKING_PASSWORD"]))
        for which, secrets in (("old", old), ("new", stack.secrets))
    }
    assert searcher == {"old": 401, "new": 200}
    registrar = {
        which: http_status(
            api,
            basic_auth("registrar", mlflow_login(secrets, "mlflow_registrar_credentials")["MLFLOW_TRACKING_PASSWORD"]),
        )
        for which, secrets in (("old", old), ("new", stack.secrets))
    }
    assert registrar == {"old": 401, "new": 200}
    os.environ["MLFLOW_TRACKING_PASSWORD"] = mlflow_login(stack.secrets)[
        "MLFLOW_TRACKING_PASSWORD"
    ]  # undone at the end
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{stack.mlflow_port}")
    assert len(trial_runs(client, record["parent_run_id"])) == TRIALS
    tags = client.get_run(record["parent_run_id"]).data.tags
    # a new driver container, as the role optuna with its new password
    assert load_optuna_study(stack, tags) == optuna_states_of_table(rows)
    print(f"[docker test] timings: {json.dumps(TIMINGS)}", flush=True)
