"""docker-compose.yml, Dockerfile, .env.example, scripts/cluster-setup.sh and constraints.txt:
checked with docker-compose's own parser (no engine needed) and structurally -- ports on loopback
only, token auth on every Ray process, secrets only as files (no value in any environment) and
each service only the secrets it uses, MLflow behind its login, a non-root service user, each GPU
reserved by one worker, one shared volume at one path, MLflow on a healthy PostgreSQL after the
role set-up, restart policies, log rotation and limits on every service, base images pinned by
digest, every command the services run exists with the options it is given, and the lock file
current with pyproject.toml and installed in the venv."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster_fixtures import (
    COMPOSE_FILE,
    ROOT,
    SECRETS,
    SECRETS_DIR,
    VENV_BIN,
    cluster_setup,
    command_of,
    environment_of,
    free_port,
    load_compose,
    mlflow_login,
    read_env_file,
    read_secrets,
)
from packaging.requirements import Requirement

RAY_NODES = ("ray-head", "ray-worker", "ray-worker-gpu")
RAY_PROCESSES = (*RAY_NODES, "driver")
SETUP = ("db-setup", "mlflow-setup")  # one-shot steps
LPT_SERVICES = (*RAY_PROCESSES, "mlflow", *SETUP, "optuna-dashboard")  # the services that run the project's image
LONG_RUNNING = (*RAY_NODES, "mlflow", "postgres", "optuna-dashboard", "s3")
SHARED = "/shared"
SERVICE_UID = "10001"
OVERRIDES = ("docker-compose.objectstore.yml", "docker-compose.head.yml")  # laid over docker-compose.yml, in this order
WORKER_FILE = "docker-compose.worker.yml"  # an extra machine's, on its own
S3_URI = "s3://lpt/runs?endpoint_override=10.0.0.1:9000&scheme=http"
RANDOM_SECRETS = ("ray_auth_token", "postgres_password", "mlflow_admin_password", "mlflow_flask_secret_key")
DIGEST_PIN = r"[a-z0-9./-]+:[\w.-]+@sha256:[0-9a-f]{64}"


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compose")
    cluster_setup(folder)
    return folder


@pytest.fixture(scope="module")
def env_values(setup_dir):
    return read_env_file(setup_dir / ".env")


@pytest.fixture(scope="module")
def services(env_values):
    return load_compose(env_values)["services"]


@pytest.fixture(scope="module")
def raw():
    return load_compose()


def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip(
            "docker-compose (v1, Debian's package) is not installed: `apt-get install docker-compose` "
            "(scripts/system-deps.sh does it when run as root); it parses the file without an engine"
        )
    return exe


def load_lock_module():
    spec = importlib.util.spec_from_file_location("lock", ROOT / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_config(tmp_path, env_text: str, *args: str) -> subprocess.CompletedProcess:
    shutil.copy(COMPOSE_FILE, tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text(env_text)
    return subprocess.run(
        [docker_compose(), "-f", "docker-compose.yml", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def resolve(tmp_path, env_text: str, files: list[str], *profiles: str) -> subprocess.CompletedProcess:
    """``docker-compose -f FILE ... [--profile P ...] config`` on copies of the checkout's files."""
    for name in {"docker-compose.yml", *files}:
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".env").write_text(env_text)
    args = [a for f in files for a in ("-f", f)] + [a for p in profiles for a in ("--profile", p)]
    return subprocess.run(
        [docker_compose(), *args, "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def resolved_services(tmp_path, env_text: str, files: list[str], *profiles: str) -> dict:
    proc = resolve(tmp_path, env_text, files, *profiles)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)["services"]


def volume_sources(svc: dict) -> dict[str, str | None]:
    """{path in the container: its source (None: a volume of the container's own)}; "rw"/"ro" last."""
    out = {}
    for v in svc.get("volumes", []):
        parts = str(v).split(":")
        if len(parts) == 1:
            out[parts[0]] = None
        else:
            out[parts[1]] = f"{parts[0]}:{parts[2] if len(parts) > 2 else 'rw'}"
    return out


def port_text(port) -> str:
    """v1 prints "127.0.0.1:5000:5000/tcp"; compose v2 the long form."""
    if isinstance(port, dict):
        return f"{port.get('host_ip')}:{port.get('published')}:{port.get('target')}/{port.get('protocol', 'tcp')}"
    return str(port)


def test_docker_compose_parses_the_file(tmp_path, env_values):
    env_text = "".join(f"{k}={v}\n" for k, v in env_values.items())
    proc = run_config(tmp_path, env_text, "config", "-q")
    assert proc.returncode == 0, proc.stderr
    # with every profile, resolved as compose would run it
    proc = run_config(
        tmp_path,
        env_text,
        "--profile",
        "gpu",
        "--profile",
        "driver",
        "--profile",
        "dashboard",
        "--profile",
        "s3",
        "config",
    )
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)["services"]
    assert set(resolved) == set(SECRETS)
    for name in RAY_PROCESSES:
        env = resolved[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == f"{SECRETS_DIR}/ray_auth_token", name
    assert {name: {s["source"] for s in svc.get("secrets", [])} for name, svc in resolved.items()} == SECRETS
    published = {
        name: [port_text(p) for p in svc.get("ports", [])] for name, svc in resolved.items() if svc.get("ports")
    }
    assert published == {
        "ray-head": ["127.0.0.1:8265:8265/tcp"],
        "mlflow": ["127.0.0.1:5000:5000/tcp"],
        "optuna-dashboard": ["127.0.0.1:8080:8080/tcp"],
        "s3": ["127.0.0.1:9000:9000/tcp"],
    }
    assert resolved["mlflow"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "db-setup": {"condition": "service_completed_successfully"},
    }
    assert resolved["driver"]["depends_on"]["mlflow-setup"] == {"condition": "service_completed_successfully"}
    # the base images: the pinned digests, unless .env names others
    assert re.fullmatch(DIGEST_PIN, resolved["postgres"]["image"]) and resolved["postgres"]["image"].startswith(
        "postgres:16"
    )
    assert re.fullmatch(DIGEST_PIN, resolved["mlflow"]["build"]["args"]["PYTHON_IMAGE"])
    proc = run_config(tmp_path, env_text + "PYTHON_IMAGE=local/python:x\nPOSTGRES_IMAGE=local/postgres:y\n", "config")
    resolved = yaml.safe_load(proc.stdout)["services"]
    assert resolved["postgres"]["image"] == "local/postgres:y"
    assert {resolved[s]["build"]["args"]["PYTHON_IMAGE"] for s in ("mlflow", "ray-head", "db-setup")} == {
        "local/python:x"
    }
    devices = resolved["ray-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_cluster_setup_makes_every_secret_once(tmp_path):
    """scripts/cluster-setup.sh: .env from the template, one random file per secret the compose
    file mounts (mode 600, in a mode-700 folder), consistent with each other, never overwritten;
    and the versions the stack runs."""
    env, first = cluster_setup(tmp_path)
    assert env == read_env_file(ROOT / ".env.example")
    folder = tmp_path / "secrets"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    files = {Path(spec["file"]).name for spec in load_compose()["secrets"].values()}
    assert files == set(first), files ^ set(first)
    for name in RANDOM_SECRETS:
        assert re.fullmatch(r"[0-9a-f]{48,64}", first[name]), name
    passwords = [first[n] for n in RANDOM_SECRETS]
    for role in ("mlflow", "optuna", "optuna_reader"):  # libpq's pgpass: one role each, its own password
        found = re.fullmatch(rf"\*:\*:mlflow:{role}:([0-9a-f]{{48}})", first[f"{role}_pgpass"])
        assert found, first[f"{role}_pgpass"]
        passwords.append(found.group(1))
    login = mlflow_login(first)
    assert login["MLFLOW_TRACKING_USERNAME"] == "searcher" and re.fullmatch(
        r"[0-9a-f]{48}", login["MLFLOW_TRACKING_PASSWORD"]
    )
    passwords.append(login["MLFLOW_TRACKING_PASSWORD"])
    assert f"admin_password = {first['mlflow_admin_password']}" in first["mlflow_auth_config"]
    # the object store's key pair: an AWS shared-credentials file, its [default] profile
    aws = configparser.ConfigParser()
    aws.read_string(first["aws_credentials"])
    assert set(aws.sections()) == {"default"} and set(aws["default"]) == {"aws_access_key_id", "aws_secret_access_key"}
    assert re.fullmatch(r"LPT[0-9a-f]{16}", aws["default"]["aws_access_key_id"])
    assert re.fullmatch(r"[0-9a-f]{48}", aws["default"]["aws_secret_access_key"])
    passwords.append(aws["default"]["aws_secret_access_key"])
    assert len(set(passwords)) == len(passwords) == 9
    assert "database_uri = postgresql+psycopg2://mlflow@postgres:5432/mlflow" in first["mlflow_auth_config"]
    # a second run keeps everything, and makes what was deleted
    (tmp_path / ".env").write_text("RAY_WORKER_CPUS=3\n")
    (folder / "ray_auth_token").unlink()
    _, second = cluster_setup(tmp_path)
    assert read_env_file(tmp_path / ".env") == {"RAY_WORKER_CPUS": "3"}
    assert {k: v for k, v in second.items() if k != "ray_auth_token"} == {
        k: v for k, v in first.items() if k != "ray_auth_token"
    }
    assert second["ray_auth_token"] != first["ray_auth_token"]


def test_cluster_setup_prints_the_versions_the_stack_runs(tmp_path):
    """The Python and PostgreSQL of the pinned base images (docker-compose.yml) and the Ray of
    constraints.txt; or, once the image is built, what the image holds."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "cluster-setup.sh"), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    ray_pin = load_lock_module().read_pins()["ray"]
    python_image = load_compose({})["services"]["mlflow"]["build"]["args"]["PYTHON_IMAGE"]
    if line.startswith("versions (image "):  # an image lpt-studies:latest is built here
        assert re.fullmatch(rf"versions \(image \S+\): Python 3\.11\.\d+, Ray {re.escape(ray_pin)}", line), line
    else:
        assert line == (
            f"versions (pinned; build the image to check them): Python 3.11.16 ({python_image}), "
            f"Ray {ray_pin} (constraints.txt), PostgreSQL 16.15"
        ), line


def test_rotate_refuses_an_unknown_secret_and_a_stopped_stack(tmp_path):
    cluster_setup(tmp_path)
    before = read_secrets(tmp_path / "secrets")
    script = str(ROOT / "scripts" / "cluster-setup.sh")
    proc = subprocess.run(
        ["bash", script, "--rotate", "ray_auth_token,nope", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --rotate nope: not a secret that can be rotated (ray_auth_token mlflow_flask_secret_key postgres_password "  # noqa: E501
        "mlflow_pgpass optuna_pgpass optuna_reader_pgpass mlflow_credentials mlflow_registrar_credentials "
        "mlflow_admin_password, or all)"
    ]
    if shutil.which("docker") or shutil.which("docker-compose"):  # no stack runs in this folder
        proc = subprocess.run(
            ["bash", script, "--rotate", "postgres_password", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "COMPOSE_PROJECT_NAME": f"lptnone{os.getpid()}"},
        )
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
            f"error: the stack in {tmp_path} is not running (postgres)"
        ), proc.stderr
    assert read_secrets(tmp_path / "secrets") == before


def test_published_ports_are_loopback_only(raw, services):
    for name, svc in raw["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    assert services["ray-head"]["ports"] == ["127.0.0.1:8265:8265"]
    assert services["optuna-dashboard"]["ports"] == ["127.0.0.1:8080:8080"]
    assert services["s3"]["ports"] == ["127.0.0.1:9000:9000"]
    assert "ports" not in services["postgres"] and "ports" not in services["ray-worker"]


def test_token_auth_on_every_ray_process(services):
    for name in RAY_PROCESSES:
        env = environment_of(services[name])
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN_PATH"] == f"{SECRETS_DIR}/ray_auth_token", name
        assert "ray_auth_token" in services[name]["secrets"], name


def test_secrets_are_files_never_values(raw, services):
    """No environment value, command argument or URI holds a secret: a variable about a secret
    holds the path of a file compose mounts as a secret of that very service."""
    text = COMPOSE_FILE.read_text()
    for name, svc in services.items():
        mounted = {f"{SECRETS_DIR}/{s}" for s in svc.get("secrets", [])} | {
            f"/run/secrets/{s}" for s in svc.get("secrets", [])
        }
        for key, value in environment_of(svc).items():
            assert not re.search(r"://[^/\s@]*:[^@/\s]*@", value), f"{name}: {key} holds a password in a URI"
            if value == SECRETS_DIR:  # the folder (LPT_SECRETS: scripts/cluster_roles.py reads its mounted files)
                continue
            if re.search(r"TOKEN|PASSWORD|SECRET|CREDENTIAL|PASS", key) or value.startswith(
                (SECRETS_DIR, "/run/secrets")
            ):
                assert value in mounted, f"{name}: {key}={value} is not the path of a secret it mounts ({mounted})"
        for arg in command_of(svc) + command_of(svc, "entrypoint"):
            assert not re.search(r"://[^/\s@]*:[^@/\s]*@", arg), f"{name}: a password in its command"
    for line in text.splitlines():
        assert not re.search(r"(?i)(token|password)\s*[:=]\s*['\"]?[A-Za-z0-9+/]{12,}", line), line
    assert {Path(spec["file"]).parent.as_posix() for spec in raw["secrets"].values()} == {"secrets"}
    for name in read_env_file(ROOT / ".env.example"):
        assert not re.search(r"TOKEN|PASSWORD|SECRET", name), f".env.example holds {name}: secrets are files"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and "secrets" in ignored and "backups" in ignored


def test_each_service_mounts_only_the_secrets_it_uses(services):
    """Least privilege: the table SECRETS, no more. No Ray node, and no process a trial could
    reach, holds the PostgreSQL superuser, MLflow's database role or the MLflow admin; the admin
    password is only in the MLflow server (its login configuration) and mlflow-setup."""
    assert {name: set(svc.get("secrets", [])) for name, svc in services.items()} == SECRETS
    for name in RAY_PROCESSES:
        assert not SECRETS[name] & {"postgres_password", "mlflow_pgpass", "mlflow_admin_password", "mlflow_auth_config"}
    holders = {name for name, secrets in SECRETS.items() if secrets & {"postgres_password"}}
    assert holders == {"postgres", "db-setup"}
    # the roles the services connect as: their own, no superuser
    assert "postgresql+psycopg2://mlflow@postgres:5432/mlflow" in command_of(services["mlflow"])
    assert environment_of(services["driver"])["LPT_OPTUNA_STORAGE"].startswith(
        "postgresql+psycopg2://optuna@postgres:5432/mlflow?"
    )
    assert environment_of(services["driver"])["PGPASSFILE"] == f"{SECRETS_DIR}/optuna_pgpass"
    dashboard = command_of(services["optuna-dashboard"])
    assert dashboard[0] == "optuna-dashboard" and dashboard[-1].startswith(
        "postgresql+psycopg2://optuna_reader@postgres:5432/"
    )
    assert environment_of(services["optuna-dashboard"])["PGPASSFILE"] == f"{SECRETS_DIR}/optuna_reader_pgpass"
    assert environment_of(services["postgres"])["POSTGRES_USER"] == "postgres"


def test_services_restart_rotate_their_logs_and_are_capped(raw, services):
    """Long-running services restart unless stopped (on-failure is not applied after a daemon or
    host restart); the one-shot set-up steps never restart; every service's json-file log rotates;
    every service has a memory and a process cap (a runaway trial is killed inside its worker)."""
    for name in LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
    for name in SETUP:
        assert services[name]["restart"] == "no", name
    assert "restart" not in services["driver"]  # a run of the CLI, ended by its command
    for name, svc in services.items():
        assert svc["logging"] == {"driver": "json-file", "options": {"max-size": "20m", "max-file": "5"}}, name
        assert re.fullmatch(r"\d+[gm]", str(svc["mem_limit"])) and int(svc["pids_limit"]) >= 256, name
    assert services["ray-worker"]["mem_limit"] == "8g" and services["postgres"]["mem_limit"] == "2g"
    env = read_env_file(ROOT / ".env.example") | {
        k: v for k, v in re.findall(r"^# ([A-Z0-9_]+)=(\S+)", (ROOT / ".env.example").read_text(), re.M)
    }
    for key in (
        "RAY_WORKER_MEMORY",
        "RAY_HEAD_MEMORY",
        "DRIVER_MEMORY",
        "MLFLOW_MEMORY",
        "POSTGRES_MEMORY",
        "S3_MEMORY",
        "LOG_MAX_SIZE",
        "LOG_MAX_FILE",
    ):
        assert key in env and f"${{{key}:-{env[key]}}}" in COMPOSE_FILE.read_text(), key  # documented with its default


def test_mlflow_behind_its_login(services):
    """The basic-auth app on PostgreSQL without a password in the URI (libpq's PGPASSFILE); the
    health check uses /health, the one path open without a login."""
    mlflow = services["mlflow"]
    argv = command_of(mlflow)
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    assert argv[argv.index("--backend-store-uri") + 1] == "postgresql+psycopg2://mlflow@postgres:5432/mlflow"
    pool = load_compose()["x-mlflow-pool"]  # the connection budget's (test_the_connection_budget_fits_...)
    env = {k: v for k, v in environment_of(mlflow).items() if k not in pool}
    assert env == {
        "PGPASSFILE": f"{SECRETS_DIR}/mlflow_pgpass",
        "MLFLOW_AUTH_CONFIG_PATH": f"{SECRETS_DIR}/mlflow_auth_config",
        "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": f"{SECRETS_DIR}/mlflow_flask_secret_key",
    }
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    for name in ("ray-worker", "ray-worker-gpu", "driver"):  # trials and the driver log in
        assert "mlflow_credentials" in services[name]["secrets"], name
    assert environment_of(services["postgres"])["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"


def test_services_run_as_the_image_user(raw, services):
    """The project's services run as the image's user (its entrypoint drops root after installing
    the secrets); none overrides the user or the entrypoint with one that skips that."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^ARG LPT_UID={SERVICE_UID}$", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["lpt-entrypoint"\]$', dockerfile, re.M)
    entrypoint = (ROOT / "scripts" / "container-entrypoint.sh").read_text()
    assert "setpriv --reuid=lpt --regid=lpt --init-groups" in entrypoint and 'exec tini -s -- "$@"' in entrypoint
    for name in LPT_SERVICES:
        svc = services[name]
        assert "user" not in svc and "init" not in svc, name  # docker's init would stay root
        assert svc.get("security_opt") == ["no-new-privileges:true"], name
        entry = command_of(svc, "entrypoint")
        assert not entry or entry[0] == "lpt-entrypoint", name


def test_the_env_file_stays_out_of_git():
    if not (shutil.which("git") and (ROOT / ".git").exists()):
        pytest.skip("not a git checkout")
    for path in (".env", "secrets/ray_auth_token"):
        check = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert check.returncode == 0, f"{path} must be ignored by git (.gitignore)"
    tracked = subprocess.run(["git", "ls-files", ".env", "secrets"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout == "", f"committed: {tracked.stdout}"


def test_one_shared_volume_at_one_path(raw, services):
    assert "shared" in raw["volumes"]
    for name in RAY_PROCESSES:
        volumes = [str(v) for v in services[name]["volumes"]]
        assert f"shared:{SHARED}" in volumes, f"{name}: {volumes}"
        data = [v for v in volumes if v.endswith(":/data:ro")]
        assert len(data) == 1, f"{name}: datasets at /data, read-only"
        assert environment_of(services[name])["LPT_STORAGE"] == f"{SHARED}/runs"
    driver = command_of(services["driver"])
    assert driver[driver.index("--storage") + 1] == f"{SHARED}/runs"


def test_services_run_what_the_issue_asks(services):
    head = command_of(services["ray-head"])
    assert head[:3] == ["ray", "start", "--head"] and "--num-cpus=0" in head and head[-1] == "--block"
    assert "--port=6379" in head and "--dashboard-port=8265" in head
    for name in ("ray-worker", "ray-worker-gpu"):
        worker = command_of(services[name])
        assert worker[:2] == ["ray", "start"] and "--address=ray-head:6379" in worker and worker[-1] == "--block"
        assert services[name]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert services["ray-worker-gpu"]["profiles"] == ["gpu"]

    mlflow = command_of(services["mlflow"])
    assert mlflow[:2] == ["mlflow", "server"] and "--serve-artifacts" in mlflow
    assert mlflow[mlflow.index("--artifacts-destination") + 1] == "/mlartifacts"
    assert mlflow[mlflow.index("--allowed-hosts") + 1] == "mlflow,mlflow:5000,localhost:*,127.0.0.1:*"
    assert mlflow[mlflow.index("--host") + 1] == "0.0.0.0" and mlflow[mlflow.index("--port") + 1] == "5000"
    assert "/mlartifacts" in [str(v).split(":")[1] for v in services["mlflow"]["volumes"]]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])

    driver = services["driver"]
    assert driver["profiles"] == ["driver"]
    env = environment_of(driver)
    assert env["RAY_ADDRESS"] == "ray-head:6379" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert command_of(driver)[:2] == ["python", "tune/search.py"]
    join = " ".join(command_of(driver, "entrypoint"))
    assert command_of(driver, "entrypoint")[:3] == ["lpt-entrypoint", "sh", "-c"]
    assert 'ray start --address="$RAY_ADDRESS" --num-cpus=0' in join
    assert 'exec python scripts/hold_db_password.py "$@"' in join
    assert (ROOT / "scripts" / "hold_db_password.py").is_file()  # the driver holds its database password in memory
    assert {"ray-head", "mlflow-setup"} == set(driver["depends_on"])  # mlflow-setup: after the MLflow server


def options_of(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def test_every_command_exists_with_its_options(services):
    """ray, mlflow and tune/search.py come from the project's install (the image installs the same
    project); each option the compose file passes is one the installed CLI knows. The postgres
    image's pg_isready is not checkable here."""
    for tool in ("ray", "mlflow"):
        assert (VENV_BIN / tool).exists(), f"{tool} is not installed in {VENV_BIN}"
    assert shutil.which("sh")
    helps = {
        "ray": [str(VENV_BIN / "ray"), "start", "--help"],
        "mlflow": [str(VENV_BIN / "mlflow"), "server", "--help"],
        "health": [str(VENV_BIN / "ray"), "health-check", "--help"],
        "optuna-dashboard": [str(VENV_BIN / "optuna-dashboard"), "--help"],
    }
    procs = {
        k: subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # at once: each imports a lot
        for k, argv in helps.items()
    }
    out = {}
    for k, proc in procs.items():
        out[k], err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{' '.join(helps[k][-3:])}: {err[-2000:]}"
    # the search CLI's options, from its argparse calls (importing it takes torch and timm)
    known = {
        **out,
        "search": "\n".join(re.findall(r'add_argument\(\s*"(--[\w-]+)"', (ROOT / "tune" / "search.py").read_text())),
    }
    join = [a for a in command_of(services["driver"], "entrypoint")[3].split() if a.startswith("--")]
    commands = (
        [("ray", command_of(services[n])) for n in RAY_NODES]
        + [("ray", join)]
        + [
            ("mlflow", command_of(services["mlflow"])),
            ("search", command_of(services["driver"])),
            ("optuna-dashboard", command_of(services["optuna-dashboard"])),
        ]
    )
    for tool, argv in commands:
        for option in options_of(argv):
            assert re.search(rf"(^|[\s,]){re.escape(option)}([\s=,/]|$)", known[tool], re.M), (
                f"{tool} does not know {option}"
            )
    assert (ROOT / command_of(services["driver"])[1]).is_file()
    # the set-up steps: scripts/cluster_roles.py and the commands it knows
    spec = importlib.util.spec_from_file_location("cluster_roles", ROOT / "scripts" / "cluster_roles.py")
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    for name in SETUP:
        argv = command_of(services[name])
        assert argv[:2] == ["python", "scripts/cluster_roles.py"] and argv[2] in roles.COMMANDS, argv
    assert set(roles.ROLES) == {"mlflow", "optuna", "optuna_reader"}
    assert {f"{role}_pgpass" for role in roles.ROLES} == set(roles.ROLES.values()) <= SECRETS["db-setup"]
    # the health checks
    head_check = services["ray-head"]["healthcheck"]["test"]
    assert head_check[1:4] == ["lpt-entrypoint", "ray", "health-check"]  # as the image's user, not root
    assert "--address" in out["health"]
    code = services["mlflow"]["healthcheck"]["test"]
    assert code[1:4] == ["lpt-entrypoint", "python", "-c"]
    ast.parse(code[4])


def test_gpu_workers_get_their_own_gpus(services):
    """One GPU worker per host holding every GPU, Ray detecting them: never two replicas handed
    the same devices (a fixed container name refuses --scale), no hard-coded GPU count."""
    gpu = services["ray-worker-gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    ]
    assert gpu.get("container_name"), "a fixed name: compose refuses to scale the GPU worker"
    assert not [a for a in command_of(gpu) if a.startswith("--num-gpus")], "Ray detects the GPUs it is given"
    for name, svc in services.items():
        if name != "ray-worker-gpu":
            assert "deploy" not in svc, f"{name} reserves devices"
    doc = (ROOT / "docs" / "cluster.md").read_text()
    commands = [line for line in doc.splitlines() if "--profile gpu" in line]
    assert commands and all("--scale ray-worker-gpu" not in line and "RAY_WORKER_GPUS" not in line for line in commands)
    assert any("--scale ray-worker=0" in line for line in commands)


def torch_closure() -> set[str]:
    """torch, torchvision and everything they install here (the venv's metadata)."""
    lock = load_lock_module()
    seen, todo = set(), ["torch", "torchvision"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for requirement in importlib.metadata.distribution(name).requires or []:
            req = Requirement(requirement)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(lock.normalize(req.name))
    return seen


def test_dockerfile_installs_the_lock():
    """The base image is the build argument PYTHON_IMAGE (docker-compose.yml passes the pinned
    digest), torch comes with its pins from constraints.txt (cut into their own file, so that the
    torch layer is built again only when they change), everything else with constraints.txt."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE$", text, re.M)  # no default: compose passes the digest
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    pins_filter = re.search(r"grep -E '(\^\(.*\)==)' \\\n\s*/tmp/constraints.txt > /tmp/torch-constraints.txt", text)
    assert pins_filter, "the torch-pins stage"
    pattern = re.compile(pins_filter.group(1))
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    missing = [
        n for n in torch_closure() if not any(pattern.match(line) and line.startswith(f"{n}==") for line in constraints)
    ]
    assert not missing, f"the torch-pins stage misses these pins of what torch installs: {missing}"
    installs = re.findall(r"pip install [^\n]*", text)
    assert len(installs) == 3, installs
    assert "-c /tmp/torch-constraints.txt torch torchvision" in installs[0]
    assert text.index("COPY --from=torch-pins /tmp/torch-constraints.txt") < text.index(installs[0])
    assert text.index(installs[0]) < text.index("COPY constraints.txt pyproject.toml ./")  # the torch layer first
    assert "-c constraints.txt" in installs[1] and "--no-deps" in installs[2]
    assert "['optional-dependencies']['cluster']" in text  # the MLflow login app, the PostgreSQL driver
    assert "TORCH_INDEX_URL" in text  # the CPU wheel index, documented
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false" in text  # no service unpickles a model
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git", "secrets"} <= set(ignore)
    assert '-c "$ROOT/constraints.txt"' in (ROOT / "scripts" / "venv.sh").read_text()
    # one place for the digests: docker-compose.yml's x-base-images, each with its version
    raw = COMPOSE_FILE.read_text()
    pins = re.findall(
        r'^  (python|postgres): &\1-image "\$\{(PYTHON|POSTGRES)_IMAGE:-(' + DIGEST_PIN + r')\}"\s+# \w+ ([\d.]+)$',
        raw,
        re.M,
    )
    assert [(p[0], p[3]) for p in pins] == [("python", "3.11.16"), ("postgres", "16.15")], pins
    assert len(re.findall(r"@sha256:", raw)) == 2 and "@sha256:" not in text


def test_the_lock_is_current_and_installed():
    """constraints.txt was resolved from today's pyproject.toml, pins a version inside every range
    pyproject.toml asks for, and is what this venv holds (scripts/venv.sh installs with it)."""
    lock = load_lock_module()
    assert lock.recorded_digest() == lock.dependency_digest(), (
        "constraints.txt is out of date with pyproject.toml: run `python scripts/lock.py`"
    )
    pins = lock.read_pins()
    meta = lock.project()
    own = lock.normalize(meta["name"])
    requirements = [Requirement(r) for r in meta["dependencies"]]
    requirements += [Requirement(r) for extra in meta["optional-dependencies"].values() for r in extra]
    for req in requirements:
        name = lock.normalize(req.name)
        if name == own:
            continue
        assert name in pins, f"constraints.txt has no pin for {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} is outside {req.specifier}"
        )
    installed = {lock.normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    differ = {n: (v, installed[n]) for n, v in pins.items() if n in installed and installed[n] != v}
    assert not differ, f"the venv differs from constraints.txt (pin, installed): {differ}"
    if sys.platform.startswith("linux") and platform.machine() == "x86_64":  # the platform it is resolved for
        missing = [n for n in pins if n not in installed]
        assert not missing, f"pinned but not installed here: {missing}"


def test_the_docs_walk_through_the_cluster():
    readme = (ROOT / "README.md").read_text()
    assert "](docs/cluster.md)" in readme, "the README links the cluster's page"
    doc = (ROOT / "docs" / "cluster.md").read_text()
    assert doc.startswith("# Run on a cluster\n")
    assert doc.split("```bash\n", 1)[1].startswith("scripts/cluster-setup.sh"), "the section starts with the set-up"
    for needle in (
        "scripts/cluster-setup.sh",
        "--scale ray-worker=",
        "docker compose run --rm driver",
        "ssh -L 5000:127.0.0.1:5000 -L 8265:127.0.0.1:8265",
        "docker compose down -v",
        "secrets/mlflow_admin_password",
        "--profile gpu",
        "10001",
        "scripts/cluster-backup.sh",
        "scripts/cluster-restore.sh",
        "scripts/cluster-setup.sh --rotate",
        "--profile dashboard",
        "optuna_reader",
        "searcher",
        "unless-stopped",
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false",
        "## 8. Storage in an object store",
        "## 9. More machines",
        "--profile s3",
        "RAY_NODE_IP=",
        "RAY_HEAD_IP=",
        "secrets/aws_credentials",
        "private network",
    ):
        assert needle in doc, needle
    # every compose file a command names exists; object storage comes first, NFS as the alternative
    named = set(re.findall(r"-f (docker-compose[\w.-]*\.yml)", doc))
    assert named == {"docker-compose.yml", WORKER_FILE, *OVERRIDES}, named
    assert all((ROOT / name).is_file() for name in named)
    more = doc[doc.index("## 8. Storage in an object store") :]
    assert more.index("object storage") < more.index("NFS")


def test_object_storage_leaves_no_folder_shared(tmp_path, env_values):
    """docker-compose.objectstore.yml over docker-compose.yml: no Ray node mounts the volume
    `shared` (each its own /shared, the weights cache), datasets stay read-only at /data, storage
    is the object store URI of .env on every node and in the driver's command, each reads the key
    pair from the secret it mounts; without LPT_STORAGE compose refuses in one line naming it."""
    env_text = "".join(f"{k}={v}\n" for k, v in env_values.items())
    files = ["docker-compose.yml", OVERRIDES[0]]
    resolved = resolved_services(tmp_path, env_text + f"LPT_STORAGE={S3_URI}\n", files, "gpu", "driver", "s3")
    for name in RAY_PROCESSES:
        svc = resolved[name]
        volumes = volume_sources(svc)
        assert volumes[SHARED] is None, f"{name}: /shared must be a volume of its own, not {volumes[SHARED]}"
        assert volumes["/data"].endswith("/data:ro") and set(volumes) == {SHARED, "/data"}, f"{name}: {volumes}"
        env = svc["environment"]
        assert env["LPT_STORAGE"] == S3_URI, name
        assert env["AWS_SHARED_CREDENTIALS_FILE"] == f"{SECRETS_DIR}/aws_credentials", name
        assert "aws_credentials" in {s["source"] for s in svc["secrets"]}, name
        assert env["RAY_AUTH_MODE"] == "token", name  # the base file's environment is kept
    driver = resolved["driver"]["command"]
    assert driver[driver.index("--storage") + 1] == S3_URI
    proc = resolve(tmp_path, env_text, files)
    assert proc.returncode != 0 and "set LPT_STORAGE in .env to an object store URI" in proc.stderr, proc.stderr
    # without the override, one host keeps its shared volume: the default storage is on it
    single = resolved_services(tmp_path, env_text, ["docker-compose.yml"], "driver")
    assert {volume_sources(single[n])[SHARED] for n in RAY_PROCESSES} == {"shared:rw"}
    assert {single[n]["environment"]["LPT_STORAGE"] for n in RAY_PROCESSES} == {f"{SHARED}/runs"}


def test_the_head_machine_opens_only_what_other_machines_need(tmp_path, env_values):
    """docker-compose.head.yml: the Ray head and the driver on the host's network, advertising
    RAY_NODE_IP; the trials' MLflow and the S3 stand-in published on RAY_NODE_IP, PostgreSQL and
    the dashboards on loopback only; MLflow's command is the base file's, allowing RAY_NODE_IP."""
    env_text = "".join(f"{k}={v}\n" for k, v in env_values.items()) + f"LPT_STORAGE={S3_URI}\n"
    files = ["docker-compose.yml", *OVERRIDES]
    proc = resolve(tmp_path, env_text, files, "driver")
    assert proc.returncode != 0 and "set RAY_NODE_IP in .env" in proc.stderr, proc.stderr
    resolved = resolved_services(tmp_path, env_text + "RAY_NODE_IP=10.0.0.1\n", files, "driver", "s3", "dashboard")
    base = resolved_services(tmp_path, env_text, ["docker-compose.yml"], "driver", "s3", "dashboard")
    for name in ("ray-head", "driver-host"):
        assert resolved[name]["network_mode"] == "host", name
    # driver-host is the base file's driver (but its addresses and networks): compose cannot merge
    # the host's network into a service on compose networks
    host, single = resolved["driver-host"], base["driver"]
    for key in ("image", "security_opt", "logging", "tmpfs", "profiles", "command", "shm_size", "mem_limit"):
        assert host[key] == single[key], key
    assert sorted(s["source"] for s in host["secrets"]) == sorted(s["source"] for s in single["secrets"])
    moved = ("RAY_NODE_IP", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LPT_OPTUNA_STORAGE", "LPT_STORAGE")
    assert {k: v for k, v in host["environment"].items() if k not in moved} == {
        k: v for k, v in single["environment"].items() if k not in moved
    }
    assert host["depends_on"] == single["depends_on"] and "networks" not in host
    head = resolved["ray-head"]["command"]
    assert "--node-ip-address=10.0.0.1" in head and "--port=6379" in head and "--dashboard-host=127.0.0.1" in head
    assert [a for a in head if a != "--node-ip-address=10.0.0.1" and not a.startswith("--dashboard-host")] == [
        a for a in base["ray-head"]["command"] if not a.startswith("--dashboard-host")
    ]
    assert resolved["ray-head"]["healthcheck"]["test"][-1] == "10.0.0.1:6379"
    join = resolved["driver-host"]["entrypoint"][3]
    assert '--address="$$RAY_ADDRESS" --node-ip-address="$$RAY_NODE_IP" --num-cpus=0' in join
    env = resolved["driver-host"]["environment"]
    assert env["RAY_ADDRESS"] == "10.0.0.1:6379" and env["RAY_NODE_IP"] == "10.0.0.1"
    assert env["MLFLOW_TRACKING_URI"] == "http://10.0.0.1:5000"
    assert env["LPT_OPTUNA_STORAGE"] == base["driver"]["environment"]["LPT_OPTUNA_STORAGE"].replace(
        "@postgres:5432/", "@127.0.0.1:5432/"
    )
    mlflow, mlflow_base = resolved["mlflow"]["command"], base["mlflow"]["command"]
    hosts = mlflow.index("--allowed-hosts") + 1
    assert mlflow[:hosts] == mlflow_base[:hosts] and mlflow[hosts] == mlflow_base[hosts] + ",10.0.0.1:*"
    published = {
        name: sorted(port_text(p) for p in svc.get("ports", []))
        for name, svc in resolved.items()
        if svc.get("ports") and svc.get("network_mode") != "host"  # the host's network publishes nothing
    }
    assert published == {
        "mlflow": ["10.0.0.1:5000:5000/tcp", "127.0.0.1:5000:5000/tcp"],
        "s3": ["10.0.0.1:9000:9000/tcp", "127.0.0.1:9000:9000/tcp"],
        "postgres": ["127.0.0.1:5432:5432/tcp"],
        "optuna-dashboard": ["127.0.0.1:8080:8080/tcp"],
    }
    for name in RAY_PROCESSES:  # the object store, no shared folder (docker-compose.objectstore.yml)
        assert volume_sources(resolved[name])[SHARED] is None, name


def test_an_extra_machine_runs_the_head_machines_worker(tmp_path, env_values, services):
    """docker-compose.worker.yml, on its own: ray-worker and ray-worker-gpu (profile gpu) join the
    head at RAY_HEAD_IP:6379 on the host's network advertising RAY_NODE_IP, with the base file's
    image, secrets, environment (but the storage and MLflow addresses), caps, logs and restart
    policy; their own data folder and weights cache, no shared volume; the GPU worker holds every
    GPU of its machine. Without RAY_HEAD_IP, RAY_NODE_IP or LPT_STORAGE compose refuses in one line."""
    env_text = "".join(f"{k}={v}\n" for k, v in env_values.items())
    needed = {"RAY_HEAD_IP": "10.0.0.1", "RAY_NODE_IP": "10.0.0.2", "LPT_STORAGE": S3_URI}
    for missing in needed:
        text = env_text + "".join(f"{k}={v}\n" for k, v in needed.items() if k != missing)
        proc = resolve(tmp_path, text, [WORKER_FILE])
        assert proc.returncode != 0 and f"set {missing} in .env" in proc.stderr, (missing, proc.stderr)
    text = env_text + "".join(f"{k}={v}\n" for k, v in needed.items())
    resolved = resolved_services(tmp_path, text, [WORKER_FILE], "gpu")
    assert set(resolved) == {"ray-worker", "ray-worker-gpu"}
    base = resolved_services(tmp_path, env_text, ["docker-compose.yml"], "gpu")
    raw_worker = load_compose(path=ROOT / WORKER_FILE)
    assert set(raw_worker["secrets"]) == SECRETS["ray-worker"] and set(raw_worker["volumes"]) == {"cache"}
    for name in ("ray-worker", "ray-worker-gpu"):
        svc, home = resolved[name], base[name]
        assert svc["network_mode"] == "host", name
        argv = svc["command"]
        assert argv[:3] == ["ray", "start", "--address=10.0.0.1:6379"] and "--node-ip-address=10.0.0.2" in argv
        assert [a for a in argv if not a.startswith(("--address", "--node-ip-address"))] == [
            a for a in home["command"] if not a.startswith("--address")
        ], name
        assert {s["source"] for s in svc["secrets"]} == SECRETS[name], name
        env, env_home = svc["environment"], home["environment"]
        assert env["LPT_STORAGE"] == S3_URI and env["MLFLOW_TRACKING_URI"] == "http://10.0.0.1:5000", name
        drop = ("LPT_STORAGE", "MLFLOW_TRACKING_URI")
        assert {k: v for k, v in env.items() if k not in drop} == {k: v for k, v in env_home.items() if k not in drop}
        for key in ("image", "security_opt", "logging", "shm_size", "mem_limit", "pids_limit", "restart"):
            assert svc[key] == home[key], (name, key)
        volumes = volume_sources(svc)
        assert volumes == {SHARED: "cache:rw", "/data": volume_sources(home)["/data"]}, volumes
        assert "depends_on" not in svc and "build" not in svc, name  # the head is on another machine
    gpu = resolved["ray-worker-gpu"]
    assert gpu["deploy"] == base["ray-worker-gpu"]["deploy"] and gpu["container_name"], "one per machine, every GPU"
    assert "deploy" not in resolved["ray-worker"]


def test_the_multi_machine_commands_exist(tmp_path, env_values):
    """Every option the head override and the worker file pass to `ray start` is one it knows."""
    env_text = "".join(f"{k}={v}\n" for k, v in env_values.items())
    env_text += f"LPT_STORAGE={S3_URI}\nRAY_NODE_IP=10.0.0.1\nRAY_HEAD_IP=10.0.0.1\n"
    head = resolved_services(tmp_path, env_text, ["docker-compose.yml", *OVERRIDES], "driver")
    worker = resolved_services(tmp_path, env_text, [WORKER_FILE], "gpu")
    known = subprocess.run(
        [str(VENV_BIN / "ray"), "start", "--help"], capture_output=True, text=True, timeout=180
    ).stdout
    argvs = [head["ray-head"]["command"], head["driver-host"]["entrypoint"][3].split()]
    argvs += [worker[n]["command"] for n in worker]
    for argv in argvs:
        for option in options_of([a.strip('"') for a in argv]):
            assert re.search(rf"(^|[\s,]){re.escape(option)}([\s=,/]|$)", known, re.M), f"ray start: {option}"
    assert head["ray-head"]["healthcheck"]["test"][1:4] == ["lpt-entrypoint", "ray", "health-check"]


def test_the_s3_stand_in_is_built_here_and_serves_its_buckets(tmp_path, services):
    """The s3 service: built from the pinned Python image (docker/s3/Dockerfile: moto[server]
    pinned by constraints.txt, not root), no secret, loopback port, a health check that asks the
    server for the buckets. Its program, run here: it makes the buckets S3_BUCKETS names, a
    pyarrow filesystem from an s3:// URI with the endpoint in it writes and reads there, and
    ``--check`` fails for a bucket that does not exist."""
    s3 = services["s3"]
    assert s3["profiles"] == ["s3"] and s3["build"]["dockerfile"] == "docker/s3/Dockerfile"
    assert s3["build"]["args"]["PYTHON_IMAGE"] == services["mlflow"]["build"]["args"]["PYTHON_IMAGE"]
    assert "secrets" not in s3 and s3["security_opt"] == ["no-new-privileges:true"]
    assert environment_of(s3) == {"S3_BUCKETS": "lpt"}
    assert s3["healthcheck"]["test"] == ["CMD", "python", "/usr/local/bin/lpt-s3", "--check"]
    dockerfile = (ROOT / "docker" / "s3" / "Dockerfile").read_text()
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${PYTHON_IMAGE}"]
    assert 'pip install -c /tmp/constraints.txt "moto[server]"' in dockerfile
    assert "COPY docker/s3/serve.py /usr/local/bin/lpt-s3" in dockerfile
    assert re.search(r"^USER s3$", dockerfile, re.M) and "--uid 10002" in dockerfile
    test_extra = {
        Requirement(r).name: Requirement(r) for r in load_lock_module().project()["optional-dependencies"]["test"]
    }
    assert "server" in test_extra["moto"].extras, "moto[server] is in the test extra, so constraints.txt pins it"
    assert "moto" in load_lock_module().read_pins()

    port = free_port()
    env = {**os.environ, "S3_PORT": str(port), "S3_BUCKETS": "lpt,other"}
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "docker" / "s3" / "serve.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert server.stdout.readline().strip() == f"S3 stand-in on :{port}, buckets: lpt, other"  # after the buckets
        check = [sys.executable, str(ROOT / "docker" / "s3" / "serve.py"), "--check"]
        assert subprocess.run(check, env=env, capture_output=True, timeout=60).returncode == 0
        missing = subprocess.run(check, env={**env, "S3_BUCKETS": "nope"}, capture_output=True, text=True, timeout=60)
        assert missing.returncode != 0 and "404" in missing.stderr
        aws = tmp_path / "credentials"
        aws.write_text("[default]\naws_access_key_id = LPTx\naws_secret_access_key = y\n")
        probe = (
            "import pyarrow.fs as f, sys; fs, p = f.FileSystem.from_uri(sys.argv[1]); "
            "o = fs.open_output_stream(p + '/a.txt'); o.write(b'whole'); o.close(); "
            "print(fs.open_input_stream(p + '/a.txt').read().decode())"
        )
        uri = f"s3://other/runs?endpoint_override=127.0.0.1:{port}&scheme=http"
        read = subprocess.run(
            [sys.executable, "-c", probe, uri],
            env={**os.environ, "AWS_SHARED_CREDENTIALS_FILE": str(aws), "AWS_DEFAULT_REGION": "us-east-1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert read.returncode == 0 and read.stdout.strip() == "whole", read.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode == 0  # SIGTERM: a clean stop (docker stop)


def load_budget_module():
    spec = importlib.util.spec_from_file_location("connection_budget", ROOT / "scripts" / "connection_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_connection_budget_fits_postgresqls_limit(services):
    """Issue 28: the worst case of every pool that can connect, from this file's own settings (the
    MLflow server's pool, its worker count at the most db-setup lets through), the driver's Optuna
    storage and search lock, optuna-dashboard's cap and the set-up, stays under PostgreSQL's
    max_connections with room for the superuser; db-setup's CONNECTION LIMITs are that table, and
    docs/cluster.md shows it. Raising a pool or the worker count fails here."""
    from tune.engine import optuna_storage

    budget = load_budget_module()
    mlflow_env, setup_env = environment_of(services["mlflow"]), environment_of(services["db-setup"])
    pool_keys = ("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", "MLFLOW_WORKERS")
    assert {k: setup_env.get(k) for k in pool_keys} == {
        k: mlflow_env[k] for k in pool_keys
    }  # one setting, both read it
    argv = command_of(services["mlflow"])
    assert argv[argv.index("--workers") + 1] == mlflow_env["MLFLOW_WORKERS"] == "2"  # .env's default
    per_engine = int(mlflow_env["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"]) + int(
        mlflow_env["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"]
    )
    # tracking, model registry, auth and jobs engines in each worker, plus the parent's auth check
    workers_max = budget.MLFLOW_WORKERS_MAX
    assert budget.mlflow_workers({"MLFLOW_WORKERS": str(workers_max)}) == workers_max
    with pytest.raises(budget.BudgetError, match=rf"^MLFLOW_WORKERS={workers_max + 1}: must be 1 to {workers_max}"):
        budget.limits({**setup_env, "MLFLOW_WORKERS": str(workers_max + 1)})
    mlflow_worst = workers_max * 4 * per_engine + 1
    driver = optuna_storage.POOL_SIZE + optuna_storage.MAX_OVERFLOW + 1  # the storage's pool, the search lock
    assert optuna_storage.engine_kwargs("postgresql://x")["pool_size"] == optuna_storage.POOL_SIZE
    optuna_worst = budget.DRIVERS_MAX * driver + 1  # db-setup makes the tables as optuna
    worst = {"mlflow": mlflow_worst, "optuna": optuna_worst, "optuna_reader": budget.READER_LIMIT}
    assert budget.limits(setup_env) == worst
    max_connections, reserved = 100, 3  # PostgreSQL's defaults; the postgres service sets neither
    assert "max_connections" not in str(services["postgres"].get("command", ""))
    assert sum(worst.values()) + budget.SUPERUSER_ROOM <= max_connections - reserved, worst
    assert budget.SUPERUSER_ROOM >= 5  # db-setup, a backup's pg_dump, a psql, and some
    assert mlflow_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # no job runners with pools of their own
    # docs/cluster.md's table: one row per role, its pools and its limit
    docs = (ROOT / "docs" / "cluster.md").read_text()
    for role, pools, limit in budget.rows(setup_env):
        assert re.search(rf"^\| `{role}` \| {re.escape(pools)} \| {limit} \|", docs, re.M), (role, pools, limit)
    assert f"| total | | {sum(worst.values())} |" in docs


def test_db_setup_refuses_a_worker_count_past_the_budget(tmp_path):
    """MLFLOW_WORKERS above the budget: db-setup fails with one line naming it before it connects,
    so the MLflow server (which waits for db-setup) does not start."""
    env = {**os.environ, "MLFLOW_WORKERS": "9", "LPT_SECRETS": str(tmp_path), "LPT_POSTGRES_ADDRESS": "127.0.0.1:9"}
    proc = subprocess.run(
        [sys.executable, "scripts/cluster_roles.py", "postgres"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "error: cluster_roles.py postgres: BudgetError: MLFLOW_WORKERS=9: must be 1 to 4, the PostgreSQL "
        "connection budget (docs/cluster.md, 'Connection budget')"
    )


def test_ray_nodes_are_off_the_database_network_and_secrets_stay_in_memory(tmp_path, env_values):
    """PostgreSQL is on the network `database` only, with its clients (MLflow, db-setup, the
    dashboard, the driver); no Ray node but the driver is on it (tests/test_docker.py: a worker's
    connection to postgres:5432 fails). Every service of the project's image keeps the
    entrypoint's copies of the secrets on a tmpfs; Ray's temp folder is bounded by a disk threshold."""
    env_text = "".join(f"{k}={v}\n" for k, v in env_values.items())
    resolved = resolved_services(tmp_path, env_text, ["docker-compose.yml"], "driver", "dashboard", "gpu", "s3")
    networks = {name: set(svc.get("networks", {})) or {"default"} for name, svc in resolved.items()}
    assert networks["postgres"] == {"database"}
    assert {n for n, nets in networks.items() if "database" in nets} == {
        "postgres",
        "mlflow",
        "db-setup",
        "driver",
        "optuna-dashboard",
    }
    assert networks["driver"] == {"default", "database"} and networks["mlflow"] == {"default", "database"}
    for name in RAY_NODES:
        assert networks[name] == {"default"}, name
    for name in LPT_SERVICES:
        assert resolved[name]["tmpfs"] == ["/run/lpt-secrets:size=1m,mode=0700,uid=10001,gid=10001"], name
    for name in RAY_PROCESSES:
        env = resolved[name]["environment"]
        assert float(env["RAY_local_fs_capacity_threshold"]) < 0.95, name  # Ray's default: 0.95
        assert int(env["RAY_ROTATION_MAX_BYTES"]) * (1 + int(env["RAY_ROTATION_BACKUP_COUNT"])) <= 512 * 2**20, name


def test_only_the_register_service_holds_the_registrar(services, setup_dir):
    """The MLflow user that may change registered models (registrar) is held by the one-shot
    register service (and mlflow-setup, which sets its password), never by a Ray node or the
    driver; register is no Ray node, runs tune/register.py with that login, and the driver's
    --register is refused with the command that runs it."""
    holders = {name for name, svc in services.items() if "mlflow_registrar_credentials" in svc.get("secrets", [])}
    assert holders == {"register", "mlflow-setup"}
    register = services["register"]
    assert set(register["secrets"]) == {"mlflow_registrar_credentials", "aws_credentials"}  # no searcher, no token
    assert register["profiles"] == ["register"] and register["restart"] == "no"
    assert register["entrypoint"] == ["lpt-entrypoint", "python", "tune/register.py"]
    env = environment_of(register)
    assert env["LPT_MLFLOW_LOGIN"] == f"{SECRETS_DIR}/mlflow_registrar_credentials"
    assert not [k for k in env if k.startswith("RAY_")] and "ray_auth_token" not in register["secrets"]
    assert register["depends_on"] == {"mlflow-setup": {"condition": "service_completed_successfully"}}
    for name in RAY_PROCESSES:
        assert "mlflow_registrar_credentials" not in services[name].get("secrets", []), name
    assert environment_of(services["driver"])["LPT_REGISTER_WITH"] == "docker compose run --rm register"
    # cluster-setup.sh made a login of its own for it, not the searcher's
    login = (setup_dir / "secrets" / "mlflow_registrar_credentials").read_text()
    assert "mlflow_tracking_username = registrar" in login
    assert login != (setup_dir / "secrets" / "mlflow_credentials").read_text()
