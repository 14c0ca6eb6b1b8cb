"""docker-compose.yml, Dockerfile and .env.example: checked with docker-compose's own parser (no
engine needed) and structurally -- ports on loopback only, token auth on every Ray process, no
secret in the files, one shared volume at one path, MLflow on a healthy PostgreSQL, and every
command the services run exists with the options it is given."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess

import pytest
import yaml

from cluster_fixtures import (COMPOSE_FILE, ROOT, SECRET_VARS, VENV_BIN, InterpolationError, command_of,
                              environment_of, load_compose, read_env_file, write_test_env)

RAY_NODES = ("ray-head", "ray-worker", "ray-worker-gpu")
RAY_PROCESSES = (*RAY_NODES, "driver")
SHARED = "/shared"


@pytest.fixture(scope="module")
def env_values(tmp_path_factory):
    return write_test_env(tmp_path_factory.mktemp("compose") / ".env")


@pytest.fixture(scope="module")
def services(env_values):
    return load_compose(env_values)["services"]


@pytest.fixture(scope="module")
def raw():
    return load_compose()


def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose (v1, Debian's package) is not installed: `apt-get install docker-compose` "
                    "(scripts/system-deps.sh does it when run as root); it parses the file without an engine")
    return exe


def run_config(tmp_path, env_text: str, *args: str) -> subprocess.CompletedProcess:
    shutil.copy(COMPOSE_FILE, tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text(env_text)
    return subprocess.run([docker_compose(), "-f", "docker-compose.yml", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


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
    proc = run_config(tmp_path, env_text, "--profile", "gpu", "--profile", "driver", "config")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)["services"]
    assert set(resolved) == {"ray-head", "ray-worker", "ray-worker-gpu", "mlflow", "postgres", "driver"}
    for name in RAY_PROCESSES:
        env = resolved[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == env_values["RAY_AUTH_TOKEN"], name
    published = {name: [port_text(p) for p in svc.get("ports", [])] for name, svc in resolved.items() if svc.get("ports")}
    assert published == {"ray-head": ["127.0.0.1:8265:8265/tcp"], "mlflow": ["127.0.0.1:5000:5000/tcp"]}
    assert resolved["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    devices = resolved["ray-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_docker_compose_refuses_to_run_without_the_secrets(tmp_path):
    """The template's empty secrets stop compose with a message naming the variable."""
    proc = run_config(tmp_path, (ROOT / ".env.example").read_text(), "config", "-q")
    assert proc.returncode != 0
    assert "RAY_AUTH_TOKEN" in proc.stderr or "POSTGRES_PASSWORD" in proc.stderr, proc.stderr


def test_our_interpolation_matches_compose_on_missing_secrets():
    template = read_env_file(ROOT / ".env.example")
    assert all(template[name] == "" for name in SECRET_VARS)
    with pytest.raises(InterpolationError, match="RAY_AUTH_TOKEN|POSTGRES_PASSWORD"):
        load_compose(template)


def test_published_ports_are_loopback_only(raw, services):
    for name, svc in raw["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    assert services["ray-head"]["ports"] == ["127.0.0.1:8265:8265"]
    assert "ports" not in services["postgres"] and "ports" not in services["ray-worker"]


def test_token_auth_on_every_ray_process(services, env_values):
    for name in RAY_PROCESSES:
        env = environment_of(services[name])
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"] == env_values["RAY_AUTH_TOKEN"], name


def test_no_secret_is_written_in_the_files(raw):
    """Secrets only as ${VAR} references to .env; .env stays out of git and of the image."""
    text = COMPOSE_FILE.read_text()
    for name, svc in raw["services"].items():
        for key, value in environment_of(svc).items():
            if re.search(r"TOKEN|PASSWORD|SECRET", key) or re.search(r"://[^/\s]*:[^@/\s]*@", value):
                assert re.search(r"\$\{(RAY_AUTH_TOKEN|POSTGRES_PASSWORD)", value), f"{name}: {key}={value}"
    for line in text.splitlines():
        assert not re.search(r"(?i)(token|password)\s*[:=]\s*['\"]?(?!\$\{)[A-Za-z0-9+/]{12,}", line), line
    for name, value in read_env_file(ROOT / ".env.example").items():
        if name in SECRET_VARS:
            assert value == "", f".env.example must leave {name} empty"
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_the_env_file_stays_out_of_git():
    if not (shutil.which("git") and (ROOT / ".git").exists()):
        pytest.skip("not a git checkout")
    check = subprocess.run(["git", "check-ignore", "-q", "--no-index", ".env"], cwd=ROOT)
    assert check.returncode == 0, ".env (the secrets) must be listed in .gitignore"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", ".env"], cwd=ROOT, capture_output=True)
    assert tracked.returncode != 0, ".env is committed"


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
    store = environment_of(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"]
    assert store.startswith("postgresql+psycopg2://mlflow:") and store.endswith("@postgres:5432/mlflow")
    assert "/mlartifacts" in [str(v).split(":")[1] for v in services["mlflow"]["volumes"]]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])

    driver = services["driver"]
    assert driver["profiles"] == ["driver"]
    env = environment_of(driver)
    assert env["RAY_ADDRESS"] == "ray-head:6379" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert command_of(driver)[:2] == ["python", "tune/search.py"]
    join = " ".join(command_of(driver, "entrypoint"))
    assert 'ray start --address="$RAY_ADDRESS" --num-cpus=0' in join and 'exec "$@"' in join
    assert {"ray-head", "mlflow"} <= set(driver["depends_on"])


def options_of(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def test_every_command_exists_with_its_options(services):
    """ray, mlflow and tune/search.py come from the project's install (the image installs the same
    project); each option the compose file passes is one the installed CLI knows. The postgres
    image's pg_isready is not checkable here."""
    for tool in ("ray", "mlflow"):
        assert (VENV_BIN / tool).exists(), f"{tool} is not installed in {VENV_BIN}"
    assert shutil.which("sh")
    helps = {"ray": [str(VENV_BIN / "ray"), "start", "--help"], "mlflow": [str(VENV_BIN / "mlflow"), "server", "--help"],
             "health": [str(VENV_BIN / "ray"), "health-check", "--help"]}
    procs = {k: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # at once: each imports a lot
             for k, argv in helps.items()}
    out = {}
    for k, proc in procs.items():
        out[k], err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{' '.join(helps[k][-3:])}: {err[-2000:]}"
    # the search CLI's options, from its argparse calls (importing it takes torch and timm)
    known = {**out, "search": "\n".join(re.findall(r'add_argument\(\s*"(--[\w-]+)"', (ROOT / "tune" / "search.py").read_text()))}
    join = [a for a in command_of(services["driver"], "entrypoint")[2].split() if a.startswith("--")]
    commands = [("ray", command_of(services[n])) for n in RAY_NODES] + [("ray", join)] + [
        ("mlflow", command_of(services["mlflow"])), ("search", command_of(services["driver"]))]
    for tool, argv in commands:
        for option in options_of(argv):
            assert re.search(rf"(^|[\s,]){re.escape(option)}([\s=,/]|$)", known[tool], re.M), \
                f"{tool} does not know {option}"
    assert (ROOT / command_of(services["driver"])[1]).is_file()
    # the health checks
    head_check = services["ray-head"]["healthcheck"]["test"]
    assert head_check[1:3] == ["ray", "health-check"]
    assert "--address" in out["health"]
    code = services["mlflow"]["healthcheck"]["test"]
    assert code[1:3] == ["python", "-c"]
    ast.parse(code[3])


def test_dockerfile_pins_match_the_project():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pin in re.findall(r'"(torch(?:vision)?==[\d.]+)"', pyproject):
        assert pin in text, f"Dockerfile must install {pin} like pyproject.toml"
    assert "psycopg2-binary" in text
    assert '"ray[default]"' in text   # the dashboard's HTTP server: port 8265 serves nothing without it
    assert "TORCH_INDEX_URL" in text  # the CPU wheel index, documented
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignore)


def test_the_docs_walk_through_the_cluster():
    readme = (ROOT / "README.md").read_text()
    assert "\n## Run on a cluster\n" in readme
    doc = readme.split("\n## Run on a cluster\n", 1)[1].split("\n## ", 1)[0]
    for needle in ("cp .env.example .env", "--scale ray-worker=", "docker compose run --rm driver",
                   "ssh -L 5000:127.0.0.1:5000 -L 8265:127.0.0.1:8265", "docker compose down -v",
                   "secrets.token_hex", "ray get-auth-token --generate"):
        assert needle in doc, needle
