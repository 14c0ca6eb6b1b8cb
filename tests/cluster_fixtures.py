"""Run the commands of docker-compose.yml as local processes on loopback (no Docker engine needed).

The cluster tests read each service's command and environment from docker-compose.yml, interpolate
them the way compose does (``${VAR:-default}``, ``${VAR:?error}``, ``$$``) from a generated env
file, and then change only what a single machine needs: service names become loopback addresses,
published ports become free ones, container paths (/shared, /mlartifacts) become temporary folders,
and each Ray node gets its own ports (several nodes share one host here). Every process is started in
its own process group and carries a marker in its environment, so teardown can stop all of them and
nothing else.

Addresses: Ray rewrites ``127.0.0.1`` and ``localhost`` (in ``--address``, ``--node-ip-address`` and
``ray.init(address=...)``) to the machine's outward IP. ``127.0.0.2`` is loopback as well, and Ray
leaves it alone, so the Ray nodes register and are reached at 127.0.0.2; everything else uses
127.0.0.1.
"""

from __future__ import annotations

import base64
import configparser
import glob
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
VENV_BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"
RAY_IP = "127.0.0.2"
MARKER = "LPT_CLUSTER_TEST"  # env var carried by every process a test starts

SECRETS_DIR = "/run/lpt-secrets"  # where the image's entrypoint installs the compose secrets
# The secrets each service mounts, and nothing else: no Ray node holds the PostgreSQL superuser's
# password, another service's database role or the MLflow admin's password (tests/test_compose.py
# checks docker-compose.yml against this table, tests/test_docker.py the running containers).
SECRETS = {
    "postgres": {"postgres_password"},
    "db-setup": {"postgres_password", "mlflow_pgpass", "optuna_pgpass", "optuna_reader_pgpass"},
    "mlflow": {"mlflow_pgpass", "mlflow_auth_config", "mlflow_flask_secret_key"},
    "mlflow-setup": {"mlflow_admin_password", "mlflow_credentials", "mlflow_registrar_credentials"},
    "ray-head": {"ray_auth_token", "aws_credentials"},
    "ray-worker": {"ray_auth_token", "mlflow_credentials", "aws_credentials"},
    "ray-worker-gpu": {"ray_auth_token", "mlflow_credentials", "aws_credentials"},
    "driver": {"ray_auth_token", "mlflow_credentials", "optuna_pgpass", "aws_credentials"},
    "optuna-dashboard": {"optuna_reader_pgpass"},
    "register": {"mlflow_registrar_credentials", "aws_credentials"},  # the registrar's login: no other service's
    "s3": set(),  # the S3 stand-in (profile "s3") takes any key pair
}


# ---------------------------------------------------------------- compose file


class InterpolationError(ValueError):
    pass


_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<named>\w+))")


def interpolate(value, env: dict):
    """Compose's variable substitution, applied to every string in ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg = m.group("op"), m.group("arg")
        current = env.get(name)
        unset = current is None
        empty = unset or current == ""
        if op in (":-", "-"):
            return arg if (empty if op == ":-" else unset) else current
        if op in (":?", "?"):
            if empty if op == ":?" else unset:
                raise InterpolationError(f"{name}: {arg}")
            return current
        return current or ""

    return _VAR.sub(sub, value)


def read_env_file(path: Path) -> dict:
    values = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def cluster_setup(folder: Path) -> tuple[dict, dict]:
    """What a user's ``scripts/cluster-setup.sh`` makes, in ``folder``: ``.env`` and ``secrets/``.
    Returns the .env values and ``{secret name: content}``."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "cluster-setup.sh"), str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/cluster-setup.sh failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return read_env_file(Path(folder) / ".env"), read_secrets(Path(folder) / "secrets")


def read_secrets(folder: Path) -> dict:
    return {p.name: p.read_text() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def mlflow_login(secrets: dict, name: str = "mlflow_credentials") -> dict:
    """The driver's and workers' MLflow login (or the secret ``name``'s: mlflow_registrar_credentials,
    the register service's), as MLflow's environment variables."""
    config = configparser.ConfigParser()
    config.read_string(secrets[name])
    return {key.upper(): value for key, value in config["mlflow"].items()}


def login_to_mlflow(secrets: dict):
    """This process's MLflow clients log in as the cluster's driver does; ``.undo()`` to log out."""
    import pytest

    patch = pytest.MonkeyPatch()
    for name, value in mlflow_login(secrets).items():
        patch.setenv(name, value)
    return patch


def load_compose(env: dict | None = None, path: Path = COMPOSE_FILE) -> dict:
    """docker-compose.yml with YAML anchors merged and, given ``env``, variables substituted."""
    data = yaml.safe_load(Path(path).read_text())
    return interpolate(data, env) if env is not None else data


def command_of(service: dict, key: str = "command") -> list[str]:
    cmd = service.get(key) or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def environment_of(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def localize(argv: list[str], subst: dict, flags: dict | None = None) -> list[str]:
    """The command for this machine: ``flags`` replace option values (``--opt=v`` or ``--opt v``),
    ``subst`` replaces service addresses and container paths inside every argument, and the
    programs (ray, mlflow, python, tune/search.py) resolve to the venv and this checkout."""
    flags = flags or {}
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        name, eq, _ = token.partition("=")
        if eq and name in flags:
            token = f"{name}={flags[name]}"
        elif token in flags and i + 1 < len(argv):
            out += [token, str(flags[token])]
            i += 2
            continue
        out.append(substitute(token, subst))
        i += 1
    if out and out[0] == "ray":
        # this interpreter's module, not the console script: a venv copied from another checkout
        # keeps that venv's Python in its scripts' first line, and Ray's workers would import there
        out[:1] = [sys.executable, "-m", "ray.scripts.scripts"]
    elif out and out[0] in ("mlflow", "python", "python3"):
        out[0] = sys.executable if out[0].startswith("python") else str(VENV_BIN / out[0])
    return [
        str(ROOT / a) if not a.startswith(("-", "/")) and a.endswith(".py") and (ROOT / a).is_file() else a for a in out
    ]


def substitute(text: str, subst: dict) -> str:
    for old, new in subst.items():
        if old.startswith("/"):  # a container path: only at the start of a path
            text = re.sub(rf"(?<![\w./-]){re.escape(old)}(?![\w.-])", new, text)
        else:
            text = text.replace(old, new)
    return text


# ---------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port free on every interface (Ray binds its servers to all of them)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Proc:
    """A process in its own group, output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path, cwd: Path | None = None):
        self.name, self.log = name, Path(log)
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        self.signal_group(signal.SIGKILL)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, grace_s: float = 15) -> None:
        if self.alive():
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_for_line(self, text: str, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if text in self.tail(10**6):
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
            time.sleep(0.5)
        raise TimeoutError(f"{self.name}: no '{text}' after {timeout_s:.0f} s:\n{self.tail()}")


def kill_marked(marker_value: str) -> list[int]:
    """SIGKILL every process whose environment carries ``MARKER=marker_value`` (Ray's workers leave
    the process group of the ``ray start`` that spawned them)."""
    needle = f"{MARKER}={marker_value}".encode() + b"\0"
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return killed


def wait_http(url: str, timeout_s: float, proc: Proc | None = None) -> None:
    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(1)
    raise TimeoutError(
        f"{url} did not answer within {timeout_s:.0f} s ({last})" + (f":\n{proc.tail()}" if proc else "")
    )


def http_status(url: str, headers: dict | None = None, timeout_s: float = 60) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def basic_auth(username: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def mlflow_login_statuses(base_url: str, login: dict) -> dict:
    """The MLflow server's answers to an API request without a login, with a wrong password and
    with the cluster's login, and to /health without one (the health checks)."""
    api = f"{base_url}/api/2.0/mlflow/experiments/search?max_results=1"
    user, password = login["MLFLOW_TRACKING_USERNAME"], login["MLFLOW_TRACKING_PASSWORD"]
    return {
        "no login": http_status(api),
        "wrong password": http_status(api, basic_auth(user, "not-" + password)),
        "login": http_status(api, basic_auth(user, password)),
        "health": http_status(f"{base_url}/health"),
    }


MLFLOW_LOGIN_EXPECTED = {"no login": 401, "wrong password": 401, "login": 200, "health": 200}


def dashboard_token_statuses(base_url: str, token: str) -> dict:
    """The Ray dashboard's job API without the token, with a wrong one and with the cluster's."""
    api = f"{base_url}/api/jobs/"
    return {
        "no token": http_status(api),
        "wrong token": http_status(api, {"Authorization": "Bearer not-the-token"}),
        "token": http_status(api, {"Authorization": f"Bearer {token}"}),
    }


DASHBOARD_TOKEN_EXPECTED = {"no token": 401, "wrong token": 403, "token": 200}


# ---------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> Path | None:
    """Debian's server binaries (initdb, pg_ctl), newest version first."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(re.sub(r"\D", "", p.split("/")[4]) or 0),
        reverse=True,
    )
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def postgres_unavailable() -> str | None:
    """Why a throwaway PostgreSQL cannot be started here, or None."""
    if not sys.platform.startswith("linux"):
        return "the cluster tests run on Linux only"
    bindir = postgres_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        return (
            "PostgreSQL server binaries (initdb, pg_ctl) not found: `apt-get install postgresql` "
            "(scripts/system-deps.sh does it when run as root)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
        if not shutil.which("runuser"):
            return "running as root and `runuser` is missing (PostgreSQL refuses to run as root)"
    if importlib.util.find_spec("psycopg2") is None:
        return (
            "psycopg2 is not installed in the venv (MLflow's PostgreSQL driver): "
            'add "psycopg2-binary" to the test extra in pyproject.toml, or pip install psycopg2-binary'
        )
    return None


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1, as the compose stack's postgres service makes
    it: the superuser ``postgres`` with a password, and an empty database ``mlflow``. Its folder
    is outside pytest's tmp_path: that one is private to the user running pytest, and PostgreSQL
    runs as the ``postgres`` user when the tests run as root."""

    user, database = "postgres", "mlflow"

    def __init__(self, password: str):
        self.password, self.port = password, free_port()
        self.bindir = postgres_bindir()
        self.base = Path(tempfile.mkdtemp(prefix="lpt-pg-"))
        self.data = self.base / "data"
        self.owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self.as_user = ["runuser", "-u", "postgres", "--"] if self.owner else []
        if self.owner:
            os.chown(self.base, self.owner.pw_uid, self.owner.pw_gid)
        self.started = False

    def _run(self, *argv: str, timeout: float = 120) -> None:
        proc = subprocess.run(
            [*self.as_user, *argv],
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:2])} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )

    def start(self) -> Postgres:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.owner:
            os.chown(pwfile, self.owner.pw_uid, self.owner.pw_gid)
        pwfile.chmod(0o600)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        )
        pwfile.unlink()
        self.start_server()
        conn = self.connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {self.database}")
        conn.close()
        return self

    def start_server(self) -> None:
        opts = (
            f"-c listen_addresses={LOOPBACK} -p {self.port} -k {self.base} -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.base / "postgres.log"),
            "-o",
            opts,
            "-w",
            "-t",
            "120",
            "start",
            timeout=150,
        )
        self.started = True

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: as ``docker restart`` stops the postgres container)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", timeout=90)
        self.started = False

    def connect(self, dbname: str | None = None, user: str | None = None, password: str | None = None):
        """A connection as the superuser, or as ``user`` with ``password``."""
        import psycopg2

        return psycopg2.connect(
            host=LOOPBACK,
            port=self.port,
            user=user or self.user,
            password=self.password if user is None else password,
            dbname=dbname or self.database,
            connect_timeout=10,
        )

    def stop(self) -> None:
        try:
            if self.started:
                self.stop_server("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


# ---------------------------------------------------------------- the whole stack

# Lists a Ray cluster's nodes from its GCS as JSON (argv: address, alive nodes to wait for or -1,
# timeout in seconds); run with the cluster's token in the environment.
LIST_NODES = r"""
import json, sys, time
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
client = GcsClient(address=sys.argv[1])
want, deadline = int(sys.argv[2]), time.time() + float(sys.argv[3])
while True:
    nodes = [{"node_id": nid.hex(), "port": n.node_manager_port, "head": n.is_head_node,
              "alive": n.state == GcsNodeInfo.ALIVE, "cpu": dict(n.resources_total).get("CPU", 0.0),
              "ip": n.node_manager_address}
             for nid, n in client.get_all_node_info(timeout=30).items()]
    if want < 0 or sum(n["alive"] for n in nodes) >= want or time.time() > deadline:
        break
    time.sleep(1)
print(json.dumps(nodes))
"""


class LocalStack:
    """PostgreSQL, the MLflow server and a Ray head started from docker-compose.yml's commands;
    ``add_workers(n)`` starts ray-worker's command n more times."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.marker = uuid.uuid4().hex
        self.env_values, self.secrets = cluster_setup(self.workdir)
        self.secrets_dir = self.workdir / "secrets"
        self.env_values["RAY_WORKER_CPUS"] = "1"  # one trial at a time per worker node
        self.env_values["RAY_WORKER_GPUS"] = "1"  # a logical GPU each: fractional GPU requests get placed
        self.compose = load_compose(self.env_values)
        self.services = self.compose["services"]
        self.shared = self.workdir / "shared"
        self.artifacts = self.workdir / "mlartifacts"
        self.shared.mkdir()
        self.artifacts.mkdir()
        # the image's home: MLflow reads the driver's and workers' login from ~/.mlflow/credentials
        self.home = self.workdir / "home"
        (self.home / ".mlflow").mkdir(parents=True)
        (self.home / ".mlflow" / "credentials").symlink_to(self.secrets_dir / "mlflow_credentials")
        # Ray's socket paths must stay short (AF_UNIX): its temp dir is a short folder in /tmp
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="lptray-"))
        self.ray_port, self.dashboard_port, self.mlflow_port = free_port(), free_port(), free_port()
        self.postgres: Postgres | None = None
        self.procs: list[Proc] = []
        self.head: Proc | None = None
        self.mlflow: Proc | None = None
        self.workers: list[Proc] = []
        self.worker_ports: list[int] = []
        self.worker_tmps: list[Path] = []

    # the single-machine stand-ins for the compose network and volumes
    @property
    def subst(self) -> dict:
        pg = f"{LOOPBACK}:{self.postgres.port}" if self.postgres else "postgres:5432"
        return {
            "ray-head:6379": f"{RAY_IP}:{self.ray_port}",
            "mlflow:5000": f"{LOOPBACK}:{self.mlflow_port}",
            "postgres:5432": pg,
            "/shared": str(self.shared),
            "/mlartifacts": str(self.artifacts),
            "/data": str(self.workdir / "data"),
            SECRETS_DIR: str(self.secrets_dir),
        }

    @property
    def tracking_uri(self) -> str:
        return f"http://{LOOPBACK}:{self.mlflow_port}"

    @property
    def ray_address(self) -> str:
        return f"{RAY_IP}:{self.ray_port}"

    def base_env(self) -> dict:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RAY_", "MLFLOW_", "LPT_")) and k not in ("HF_HOME",)
        }
        env.update(
            {
                MARKER: self.marker,
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                "HF_HUB_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
                "HOME": str(self.home),
            }
        )
        return env

    def service_env(self, name: str) -> dict:
        env = self.base_env()
        env.update({k: substitute(v, self.subst) for k, v in environment_of(self.services[name]).items()})
        # what the image's entrypoint does with NAME_FILE=/run/lpt-secrets/x (AWS_*_FILE stay paths)
        for key in [
            k
            for k, v in env.items()
            if k.endswith("_FILE") and not k.startswith("AWS_") and v.startswith(f"{self.secrets_dir}/")
        ]:
            env[key[: -len("_FILE")]] = Path(env.pop(key)).read_text()
        return env

    def start_postgres(self) -> None:
        """PostgreSQL as the postgres service makes it, then the db-setup service's roles."""
        self.postgres = Postgres(self.secrets["postgres_password"]).start()
        # the MLflow login app's settings name the database by its compose address
        config = self.secrets_dir / "mlflow_auth_config"
        config.write_text(substitute(config.read_text(), self.subst))
        self.run_setup("db-setup")

    def run_setup(self, service: str, *args: str, stdin: str | None = None) -> str:
        """A one-shot set-up service's command (or ``args`` instead), run to its end; its output."""
        argv = localize(list(args) or command_of(self.services[service]), self.subst)
        proc = subprocess.run(
            argv,
            env=self.service_env(service),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{service} ({' '.join(argv[1:])}) failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                f"\n{proc.stderr[-3000:]}"
            )
        return proc.stdout

    def start_mlflow(self) -> Proc:
        flags = {"--host": LOOPBACK, "--port": self.mlflow_port}
        argv = localize(command_of(self.services["mlflow"]), self.subst, flags)
        proc = Proc(
            "mlflow server", argv, self.service_env("mlflow"), self.workdir / "mlflow-server.log", cwd=self.workdir
        )
        self.procs.append(proc)
        self.mlflow = proc
        return proc

    def wait_mlflow(self, timeout_s: float = 240) -> None:
        """The MLflow server answers; then the mlflow-setup service's user is made."""
        wait_http(f"{self.tracking_uri}/health", timeout_s, self.mlflow)
        self.run_setup("mlflow-setup")

    def _node_ports(self) -> tuple[list[str], int]:
        manager = free_port()
        return [
            f"--node-ip-address={RAY_IP}",
            f"--node-manager-port={manager}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ], manager

    def start_head(self, timeout_s: float = 180) -> Proc:
        flags = {"--port": self.ray_port, "--dashboard-host": LOOPBACK, "--dashboard-port": self.dashboard_port}
        extra, _ = self._node_ports()
        argv = (
            localize(command_of(self.services["ray-head"]), self.subst, flags) + extra + [f"--temp-dir={self.ray_tmp}"]
        )
        self.head = Proc("ray head", argv, self.service_env("ray-head"), self.workdir / "ray-head.log")
        self.procs.append(self.head)
        self.head.wait_for_line("Ray runtime started", timeout_s)
        return self.head

    def add_workers(self, count: int, timeout_s: float = 180) -> list[Proc]:
        """Start ray-worker's command ``count`` times at once (like ``--scale ray-worker=N``), each
        node with its own ports and temp dir (its own container's /tmp/ray under compose)."""
        started = []
        for _ in range(count):
            extra, manager = self._node_ports()
            temp = Path(tempfile.mkdtemp(prefix="lptray-"))
            self.worker_tmps.append(temp)
            argv = localize(command_of(self.services["ray-worker"]), self.subst) + extra + [f"--temp-dir={temp}"]
            n = len(self.workers) + 1
            proc = Proc(f"ray worker {n}", argv, self.service_env("ray-worker"), self.workdir / f"ray-worker-{n}.log")
            self.procs.append(proc)
            self.workers.append(proc)
            self.worker_ports.append(manager)
            started.append(proc)
        for proc in started:
            proc.wait_for_line("Ray runtime started", timeout_s)
        return started

    def nodes(self, expect_alive: int | None = None, timeout_s: float = 120) -> list[dict]:
        """The cluster's nodes from its GCS (through a client holding the token); with
        ``expect_alive``, waits until that many are alive."""
        proc = subprocess.run(
            [sys.executable, "-c", LIST_NODES, self.ray_address, str(expect_alive or -1), str(timeout_s)],
            env=self.service_env("ray-head"),
            capture_output=True,
            text=True,
            timeout=timeout_s + 90,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"could not list the Ray nodes:\n{proc.stderr[-3000:]}")
        nodes = json.loads(proc.stdout.strip().splitlines()[-1])
        if expect_alive is not None and sum(n["alive"] for n in nodes) < expect_alive:
            raise TimeoutError(f"{expect_alive} Ray nodes expected alive after {timeout_s:.0f} s: {nodes}")
        return nodes

    def driver_argv(self, *extra: str, flags: dict | None = None) -> list[str]:
        return localize(command_of(self.services["driver"]), self.subst, flags) + list(extra)

    def stop(self) -> None:
        """Everything down: the Ray nodes killed (a throwaway cluster has nothing to save), the
        MLflow server terminated, PostgreSQL stopped, the folders outside workdir removed."""
        try:
            for proc in reversed(self.procs):
                if proc is self.mlflow:
                    proc.stop(grace_s=5)
                else:
                    proc.kill()
            kill_marked(self.marker)
        finally:
            if self.postgres is not None:
                self.postgres.stop()
            for folder in (self.ray_tmp, *self.worker_tmps):
                shutil.rmtree(folder, ignore_errors=True)
