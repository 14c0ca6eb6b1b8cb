"""A Ray cluster whose machines share no folder: the compose stack's commands on loopback (see
cluster_fixtures.py), with the driver and each Ray node (head, worker 1, worker 2) in its own mount
and PID namespace (``unshare --mount --pid``): a private tmpfs on /tmp, /var/tmp and /dev/shm, the
rest of the filesystem read-only, and its own loopback IP. Storage is an S3 server on loopback
(moto, the stand-in Ray's own tests use for S3); every node reads its credentials from its own
AWS shared-credentials file. PostgreSQL, the MLflow server and the S3 server stand for the other
machines a user brings.

The driver machine joins the cluster as a zero-CPU Ray node of its own (as the compose driver
does); in its own PID namespace ``ray.init`` finds only that node's raylet, whose session folder
it can see. Killing a node's namespace (its process group) is losing that machine.

Slow. Needs PostgreSQL's server binaries, psycopg2, moto[server] and ``unshare`` with the right
to mount (root); skips with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_fixtures import (
    ROOT,
    LocalStack,
    Proc,
    command_of,
    free_port,
    localize,
    login_to_mlflow,
    postgres_unavailable,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HEAD_IP, WORKER_IPS, DRIVER_IPS = "127.0.0.2", ("127.0.0.3", "127.0.0.4"), ("127.0.0.5", "127.0.0.6")
NODE = "/tmp/node"  # each namespace's own folder (its private /tmp)
BUCKET, PREFIX = "lpt", "runs"
SEARCH_TIMEOUT_S = 420

# Runs as the first process of a new mount and PID namespace (argv: stage, mountpoint, command...):
# a private tmpfs filled from the stage folder becomes /tmp, /var/tmp and /dev/shm get their own,
# and / is read-only, so nothing this namespace writes can reach another one through a folder.
NAMESPACE = r"""
set -eu
stage=$1 mnt=$2; shift 2
mount -t tmpfs -o mode=1777 tmpfs "$mnt"
cp -a "$stage/." "$mnt/"
mount --move "$mnt" /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -o remount,bind,ro /
cd /tmp/node
exec "$@"
"""

# The driver machine: join the cluster as a zero-CPU node on its own IP, then run the command.
DRIVER = r"""
"$PY" -m ray.scripts.scripts start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 --disable-usage-stats \
  --node-ip-address="$NODE_IP" --temp-dir=/tmp/ray $NODE_PORTS >/tmp/node/ray-join.log 2>&1 \
  || { cat /tmp/node/ray-join.log >&2; exit 1; }
exec "$@"
"""


def namespaces_unavailable() -> str | None:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return "needs Linux with util-linux's `unshare`"
    proc = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "mount", "-t", "tmpfs", "t", "/mnt"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        return f"cannot make a mount namespace with its own tmpfs here (root needed): {proc.stderr.strip()[:200]}"
    return None


def node_ports(ip: str) -> list[str]:
    return [
        f"--node-ip-address={ip}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]


def ray_argv(argv: list[str]) -> list[str]:
    """``ray ...`` as this interpreter's module: the venv's console scripts may name another venv's
    Python in their first line, whose Ray workers would import another checkout."""
    assert Path(argv[0]).name == "ray", argv
    return [sys.executable, "-m", "ray.scripts.scripts", *argv[1:]]


class S3Server:
    """moto's S3 server on 127.0.0.1 with one bucket, and a shared-credentials file's text."""

    def __init__(self):
        import secrets

        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.access_key = "AKIA" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.credentials = (
            f"[default]\naws_access_key_id = {self.access_key}\naws_secret_access_key = {self.secret_key}\n"
        )
        self.client().create_bucket(Bucket=BUCKET)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, prefix: str = PREFIX) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=f"http://{self.endpoint}",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def stop(self) -> None:
        self.server.stop()


class IsolatedCluster:
    """The stack's services (PostgreSQL, MLflow) as in tests/test_cluster.py, and Ray nodes and
    drivers each in namespaces of their own."""

    def __init__(self, workdir: Path):
        self.stack = LocalStack(workdir)
        self.workdir = Path(workdir)
        self.s3: S3Server | None = None
        self.ray_port = free_port()
        self.head: Proc | None = None
        self.workers: list[Proc] = []
        self.count = 0

    @property
    def ray_address(self) -> str:
        return f"{HEAD_IP}:{self.ray_port}"

    def stage(self, name: str, service: str) -> tuple[Path, Path]:
        """The files a machine of ``service`` holds (its secrets, its MLflow login in its home, its
        AWS credentials), in a folder its namespace copies to its private /tmp."""
        self.count += 1
        base = self.workdir / f"ns-{self.count}-{name}"
        node = base / "stage" / "node"
        (node / "secrets").mkdir(parents=True)
        for secret in sorted(self.stack_secrets(service)):
            shutil.copy(self.stack.secrets_dir / secret, node / "secrets" / secret)
        (node / "secrets" / "aws_credentials").write_text(self.s3.credentials)
        (node / "home" / ".mlflow").mkdir(parents=True)
        if "mlflow_credentials" in self.stack_secrets(service):
            shutil.copy(self.stack.secrets_dir / "mlflow_credentials", node / "home" / ".mlflow" / "credentials")
        (base / "mnt").mkdir()
        return base / "stage", base / "mnt"

    @staticmethod
    def stack_secrets(service: str) -> set:
        from cluster_fixtures import SECRETS

        return SECRETS[service]

    def env(self, service: str, **extra: str) -> dict:
        """The service's environment with every path of this machine's folders replaced by the
        namespace's own."""
        env = self.stack.service_env(service)
        moved = {str(self.stack.secrets_dir): f"{NODE}/secrets", str(self.stack.home): f"{NODE}/home"}
        for key, value in env.items():
            for old, new in moved.items():
                value = value.replace(old, new)
            env[key] = value
        env.pop("LPT_STORAGE", None)
        env.update(
            {
                "HOME": f"{NODE}/home",
                "HF_HOME": f"{NODE}/huggingface",
                "AWS_SHARED_CREDENTIALS_FILE": f"{NODE}/secrets/aws_credentials",
                "TMPDIR": "/tmp",
                **extra,
            }
        )
        leaks = {k: v for k, v in env.items() if str(self.workdir) in v}
        assert not leaks, f"{service}'s environment names a folder outside its namespace: {leaks}"
        return env

    def spawn(self, name: str, service: str, argv: list[str], env: dict) -> Proc:
        stage, mnt = self.stage(name, service)
        wrapped = [
            "unshare",
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "--propagation",
            "private",
            "bash",
            "-c",
            NAMESPACE,
            "namespace",
            str(stage),
            str(mnt),
            *argv,
        ]
        proc = Proc(name, wrapped, env, self.workdir / f"{name}.log", cwd=ROOT)
        self.stack.procs.append(proc)
        return proc

    def start(self) -> None:
        stack = self.stack
        self.s3 = S3Server()
        stack.start_postgres()
        stack.start_mlflow()
        services = stack.services
        head = localize(
            command_of(services["ray-head"]),
            stack.subst,
            {"--port": self.ray_port, "--dashboard-host": HEAD_IP, "--dashboard-port": free_port()},
        )
        self.head = self.spawn(
            "ray-head", "ray-head", ray_argv(head) + node_ports(HEAD_IP) + ["--temp-dir=/tmp/ray"], self.env("ray-head")
        )
        self.head.wait_for_line("Ray runtime started", 180)
        worker = localize(command_of(services["ray-worker"]), {**stack.subst, "ray-head:6379": self.ray_address})
        for n, ip in enumerate(WORKER_IPS, 1):
            argv = ray_argv(worker) + node_ports(ip) + ["--temp-dir=/tmp/ray"]
            self.workers.append(self.spawn(f"ray-worker-{n}", "ray-worker", argv, self.env("ray-worker")))
        for proc in self.workers:
            proc.wait_for_line("Ray runtime started", 180)
        stack.wait_mlflow()

    def driver(self, name: str, ip: str, storage: str, *args: str) -> Proc:
        """The driver service's command from a machine of its own, with ``--storage storage`` and
        ``args`` after the command."""
        argv = localize(command_of(self.stack.services["driver"]), self.stack.subst, {"--storage": storage})
        argv += list(args)
        env = self.env(
            "driver",
            RAY_ADDRESS=self.ray_address,
            NODE_IP=ip,
            NODE_PORTS=" ".join(node_ports(ip)[1:]),
            PY=sys.executable,
        )
        return self.spawn(name, "driver", ["bash", "-c", DRIVER, "driver", *argv], env)

    def stop(self) -> None:
        try:
            self.stack.stop()
        finally:
            if self.s3 is not None:
                self.s3.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    for reason in (postgres_unavailable(), namespaces_unavailable()):
        if reason:
            pytest.skip(reason)
    for module in ("moto", "boto3"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: the test extra has moto[server]")
    cluster = IsolatedCluster(tmp_path_factory.mktemp("isolated"))
    login = login_to_mlflow(cluster.stack.secrets)
    try:
        started = time.time()
        cluster.start()
        print(f"isolated cluster up in {time.time() - started:.0f} s")
        yield cluster
    finally:
        cluster.stop()
        login.undo()


def run_driver(
    cluster: IsolatedCluster, name: str, ip: str, storage: str, *args: str, timeout_s: float = SEARCH_TIMEOUT_S
) -> Proc:
    proc = cluster.driver(name, ip, storage, *args)
    try:
        proc.popen.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.stop()
        pytest.fail(f"{name} did not finish within {timeout_s} s:\n{proc.tail(6000)}")
    return proc


def test_a_local_storage_path_is_refused_by_the_preflight(cluster):
    """Negative control: with a plain local path as --storage, the folder the driver writes is not
    on the workers (each has its own /tmp), and the preflight refuses the search in one line."""
    proc = run_driver(cluster, "driver-local-path", DRIVER_IPS[0], "/tmp/lpt-runs", timeout_s=240)
    out = proc.tail(20000)
    assert proc.popen.returncode == 2, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    print(f"negative control: {errors[0]}")
    assert errors[0].startswith("error: --storage /tmp/lpt-runs: node "), errors[0]
    assert any(ip in errors[0] for ip in WORKER_IPS), errors[0]
