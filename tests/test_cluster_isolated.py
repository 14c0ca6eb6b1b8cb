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
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from cluster_fixtures import (
    RAY_IP,
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

HEAD_IP, WORKER_IPS, DRIVER_IPS = RAY_IP, ("127.0.0.3", "127.0.0.4"), ("127.0.0.5", "127.0.0.6")
NODE = "/tmp/node"  # each namespace's own folder (its private /tmp)
# what a private /tmp must not hide: the checkout and the interpreter's prefix (a CI clone may live in /tmp)
_UNDER_TMP = [p for p in (ROOT.resolve(), Path(sys.prefix).resolve()) if p.is_relative_to("/tmp")]
KEEP = " ".join(sorted({str(p) for p in _UNDER_TMP if not any(p != q and p.is_relative_to(q) for q in _UNDER_TMP)}))
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
for keep in ${LPT_NS_KEEP:-}; do  # this checkout and its venv when they live under /tmp: kept, read-only
  mkdir -p "$mnt${keep#/tmp}"
  mount --bind "$keep" "$mnt${keep#/tmp}"
  mount -o remount,bind,ro "$mnt${keep#/tmp}"
done
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


class S3Server:
    """moto's S3 server on 127.0.0.1 with one bucket, and a shared-credentials file's text."""

    def __init__(self):
        import logging
        import secrets

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

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
        self.stack.ray_port = self.ray_port  # the stack's node listing asks this head (at HEAD_IP, as RAY_IP)
        self.head: Proc | None = None
        self.workers: list[Proc] = []
        self.count = 0

    @property
    def ray_address(self) -> str:
        return f"{HEAD_IP}:{self.ray_port}"

    def stage(self, name: str, service: str, files: dict | None = None) -> tuple[Path, Path]:
        """The files a machine of ``service`` holds (its secrets, its MLflow login in its home, its
        AWS credentials, ``files``: {name: text}), in a folder its namespace copies to its private /tmp."""
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
        for file, text in (files or {}).items():
            (node / file).write_text(text)
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

    def spawn(self, name: str, service: str, argv: list[str], env: dict, files: dict | None = None) -> Proc:
        stage, mnt = self.stage(name, service, files)
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
        proc = Proc(name, wrapped, {**env, "LPT_NS_KEEP": KEEP}, self.workdir / f"{name}.log", cwd=ROOT)
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
            "ray-head", "ray-head", head + node_ports(HEAD_IP) + ["--temp-dir=/tmp/ray"], self.env("ray-head")
        )
        self.head.wait_for_line("Ray runtime started", 180)
        for n in range(1, len(WORKER_IPS) + 1):
            self.add_worker(n)
        for proc in self.workers:
            proc.wait_for_line("Ray runtime started", 180)
        stack.wait_mlflow()
        stack.nodes(expect_alive=1 + len(WORKER_IPS))

    def driver(
        self, name: str, ip: str, storage: str, *args: str, flags: dict | None = None, files: dict | None = None
    ) -> Proc:
        """The driver service's command from a machine of its own, with ``--storage storage``,
        ``flags`` and ``args`` after the command."""
        flags = {"--storage": storage, **(flags or {})}
        argv = localize(command_of(self.stack.services["driver"]), self.stack.subst, flags) + list(args)
        env = self.env(
            "driver",
            RAY_ADDRESS=self.ray_address,
            NODE_IP=ip,
            NODE_PORTS=" ".join(node_ports(ip)[1:]),
            PY=sys.executable,
        )
        return self.spawn(name, "driver", ["bash", "-c", DRIVER, "driver", *argv], env, files)

    def host(self, name: str, *argv: str) -> subprocess.CompletedProcess:
        """``argv`` run to its end on a machine of its own holding the driver's secrets (a report host)."""
        proc = self.spawn(name, "driver", [sys.executable, *argv], self.env("driver"))
        try:
            proc.popen.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.stop()
        return subprocess.CompletedProcess(argv, proc.popen.returncode, proc.tail(20000), "")

    def add_worker(self, n: int) -> Proc:
        """Ray worker ``n`` on its IP, a fresh machine (a new namespace: empty /tmp)."""
        worker = localize(
            command_of(self.stack.services["ray-worker"]), {**self.stack.subst, "ray-head:6379": self.ray_address}
        )
        argv = worker + node_ports(WORKER_IPS[n - 1]) + ["--temp-dir=/tmp/ray"]
        proc = self.spawn(f"ray-worker-{n}", "ray-worker", argv, self.env("ray-worker"))
        if n <= len(self.workers):
            self.workers[n - 1] = proc
        else:
            self.workers.append(proc)
        return proc

    def node_ids(self) -> dict:
        """{IP: node id} of the alive Ray nodes."""
        return {n["ip"]: n["node_id"] for n in self.stack.nodes() if n["alive"]}

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


def test_two_namespaces_share_no_writable_folder(tmp_path):
    """What one namespace writes to its /tmp, /var/tmp and /dev/shm the next one does not see, and
    the rest of the filesystem (this checkout among it) is read-only in both."""
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    probe = ROOT / f".ns-probe-{os.getpid()}"
    write = f"touch /tmp/a /var/tmp/a /dev/shm/a; touch {probe} 2>/dev/null && echo WROTE-ROOT; echo DONE"
    look = "ls /tmp/a /var/tmp/a /dev/shm/a 2>/dev/null; echo DONE"
    seen = {}
    for name, script in (("first", write), ("second", look)):
        (tmp_path / name / "stage" / "node").mkdir(parents=True)
        (tmp_path / name / "mnt").mkdir()
        argv = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private"]
        argv += ["bash", "-c", NAMESPACE, "ns", str(tmp_path / name / "stage"), str(tmp_path / name / "mnt")]
        proc = subprocess.run(
            [*argv, "bash", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "LPT_NS_KEEP": KEEP},
        )
        seen[name] = proc.stdout.split()
    assert seen == {"first": ["DONE"], "second": ["DONE"]}, seen
    assert not probe.exists() and not (Path("/tmp") / "a").exists()


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


# The search the tests below follow: a study whose trials may fail (a node is lost) and are never
# stopped early (the victim must live until the kill), a few short trials.
STUDY, EPOCHS, TRIALS, MORE_TRIALS = "node_loss", 3, 2, 4
SETS = ("--set", f"phase2.epochs={EPOCHS}")


def study_text() -> str:
    study = yaml.safe_load((ROOT / "studies" / "prompt_pool.yaml").read_text())
    study["budget"]["max_failures"] = 5
    study["early_stopping"]["enabled"] = False
    return yaml.safe_dump(study)


def search_prefix(cluster: IsolatedCluster) -> str | None:
    """The key prefix of the search folder in the bucket, once its search.json is there."""
    found = [k for k in cluster.s3.keys(f"{PREFIX}/{STUDY}-smoke-") if k.count("/") == 2 and k.endswith("/search.json")]
    assert len(found) <= 1, found
    return found[0].rsplit("/", 1)[0] if found else None


def trial_runs(client, record: dict):
    return client.search_runs(
        [record["experiment_id"]],
        f"tags.`mlflow.parentRunId` = '{record['parent_run_id']}' and tags.`lpt.role` = 'trial'",
        max_results=200,
    )


@pytest.fixture(scope="module")
def searched(cluster):
    """The search from a driver machine of its own; worker 2 is lost while a trial it runs has a
    checkpoint in the bucket. Returns what the tests below check."""
    from mlflow import MlflowClient

    client = MlflowClient(cluster.stack.tracking_uri)
    ids = cluster.node_ids()
    workers = [ids[ip] for ip in WORKER_IPS]
    started = time.time()
    proc = cluster.driver(
        "driver-1",
        DRIVER_IPS[0],
        cluster.s3.uri(),
        "--trials",
        str(TRIALS),
        *SETS,
        flags={"--study": f"{NODE}/{STUDY}.yaml"},
        files={f"{STUDY}.yaml": study_text()},
    )
    seen_nodes, victim, deadline = set(), None, time.time() + 300
    try:
        while victim is None:
            assert time.time() < deadline, f"no trial checkpointed on worker 2 in time:\n{proc.tail()}"
            assert proc.alive(), f"the search ended before worker 2 could be killed:\n{proc.tail()}"
            time.sleep(1)
            prefix = search_prefix(cluster)
            if prefix is None:
                continue
            record = json.loads(cluster.s3.read(f"{prefix}/search.json"))
            for run in trial_runs(client, record):
                seen_nodes.add(run.data.tags.get("lpt.node"))
                if run.data.tags.get("lpt.node") != workers[1] or run.info.status != "RUNNING":
                    continue
                trial_id = run.data.tags["lpt.trial_id"]
                steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
                checkpoints = [k for k in cluster.s3.keys(f"{prefix}/") if trial_id in k and "/checkpoint_" in k]
                if steps and max(steps) < EPOCHS and checkpoints:
                    victim = {"trial_id": trial_id, "run_id": run.info.run_id, "epoch": max(steps)}
                    break
        time.sleep(1)  # let the driver register the checkpoint it was just told about
        killed_at = time.time()
        cluster.workers[1].kill()  # the namespace's first process: the whole machine goes
        print(f"killed worker 2 while trial {victim['trial_id']} was past epoch {victim['epoch']}")
        proc.popen.wait(timeout=SEARCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the search did not finish within {SEARCH_TIMEOUT_S} s:\n{proc.tail(6000)}")
    finally:
        proc.stop()
    assert proc.popen.returncode == 0, f"the search failed ({proc.popen.returncode}):\n{proc.tail(6000)}"
    ended = time.time()
    print(f"search: {ended - started:.0f} s, of which {ended - killed_at:.0f} s after the kill")
    prefix = search_prefix(cluster)
    record = json.loads(cluster.s3.read(f"{prefix}/search.json"))
    return {
        "prefix": prefix,
        "record": record,
        "victim": victim,
        "workers": workers,
        "seen_nodes": seen_nodes - {None},
        "seen_trials": {r["trial_id"] for r in read_table(cluster, f"{prefix}/trials.parquet")},
        "wall_s": ended - started,
        "log": proc.tail(10**6),
    }


def read_table(cluster: IsolatedCluster, key: str) -> list[dict]:
    return pq.read_table(pa.BufferReader(cluster.s3.read(key))).to_pylist()


def test_trials_spread_over_both_workers_and_survive_losing_one(cluster, searched):
    """Trials ran on both workers (their runs' lpt.node tags while the search ran); the trial
    worker 2 ran when it was lost was retried on worker 1 from its checkpoint in the bucket, in the
    same MLflow run; the search ended with its whole budget."""
    from mlflow import MlflowClient

    client = MlflowClient(cluster.stack.tracking_uri)
    workers, victim, record = searched["workers"], searched["victim"], searched["record"]
    assert searched["seen_nodes"] == set(workers), (searched["seen_nodes"], workers)
    rows = read_table(cluster, f"{searched['prefix']}/trials.parquet")
    assert len(rows) == TRIALS and len({r["trial_id"] for r in rows}) == TRIALS
    assert all(r["status"] == "completed" for r in rows), rows
    runs = trial_runs(client, record)
    assert len(runs) == TRIALS  # the retry reused the trial's run
    assert {r.data.tags["lpt.node"] for r in runs} <= set(workers)
    run = client.get_run(victim["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("lpt.resumed") == "true"
    assert int(run.data.tags["lpt.resumed_at_epoch"]) >= 1
    assert run.data.tags["lpt.node"] == workers[0]  # the retry ran on the surviving worker
    steps = sorted({m.step for m in client.get_metric_history(victim["run_id"], "val_acc")})
    assert steps == list(range(1, EPOCHS + 1))


def test_the_search_lives_in_the_bucket(cluster, searched):
    """What a search writes, as objects under its prefix; the parent run's lpt.storage tag names
    the search folder's URI (endpoint included, no credentials)."""
    from mlflow import MlflowClient

    prefix, record = searched["prefix"], searched["record"]
    keys = cluster.s3.keys(f"{PREFIX}/")
    mine = [k[len(prefix) + 1 :] for k in keys if k.startswith(prefix + "/")]
    print(f"{len(keys)} objects under s3://{BUCKET}/{PREFIX}/:\n  " + "\n  ".join(sorted(keys)))
    rows = read_table(cluster, f"{prefix}/trials.parquet")
    for name in ("search.json", "trials.parquet", "profile.yaml", "tuner.pkl"):
        assert name in mine or any(k.endswith("/" + name) for k in mine), (name, mine)
    assert {f"prompts/{r['trial_id']}.safetensors" for r in rows} <= set(mine), mine
    assert any(k.startswith("report/") for k in mine), mine
    assert any("experiment_state-" in k and k.endswith(".json") for k in mine), mine
    assert any("/checkpoint_" in k for k in mine), mine
    cache = [k for k in keys if k.startswith(f"{PREFIX}/phase1-cache/")]
    assert any(k.endswith("/prompts.safetensors") for k in cache) and any(k.endswith("/info.json") for k in cache)
    tag = MlflowClient(cluster.stack.tracking_uri).get_run(record["parent_run_id"]).data.tags["lpt.storage"]
    assert tag.startswith(f"s3://{BUCKET}/{prefix}") and cluster.s3.endpoint in tag, tag
    assert cluster.s3.secret_key not in tag and "secret" not in tag.lower(), tag


@pytest.fixture(scope="module")
def extended(cluster, searched):
    """Worker 2 back as a fresh machine; then ``--resume --trials MORE_TRIALS --confirm 1`` from
    another driver machine (the first one's /tmp is gone with it); then the register service's
    command (as registrar, from a machine of its own: the driver may not register)."""
    proc = cluster.add_worker(2)
    proc.wait_for_line("Ray runtime started", 180)
    ids = cluster.node_ids()
    started = time.time()
    proc = cluster.driver(
        "driver-2",
        DRIVER_IPS[1],
        cluster.s3.uri(),
        "--resume",
        "--trials",
        str(MORE_TRIALS),
        "--confirm",
        "1",
        *SETS,
        flags={"--study": f"{NODE}/{STUDY}.yaml"},
        files={f"{STUDY}.yaml": study_text()},
    )
    try:
        proc.popen.wait(timeout=SEARCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the extension did not finish within {SEARCH_TIMEOUT_S} s:\n{proc.tail(6000)}")
    finally:
        proc.stop()
    assert proc.popen.returncode == 0, f"the extension failed ({proc.popen.returncode}):\n{proc.tail(6000)}"
    # the register service waits for mlflow-setup (compose's depends_on), which grants registrar
    # EDIT on the experiments made since, this search's among them
    cluster.stack.run_setup("mlflow-setup")
    argv = [sys.executable, str(ROOT / "tune" / "register.py"), "--study", STUDY]
    proc = cluster.spawn("register", "register", argv, cluster.env("register"))
    try:
        proc.popen.wait(timeout=SEARCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the registration did not finish within {SEARCH_TIMEOUT_S} s:\n{proc.tail(6000)}")
    finally:
        proc.stop()
    assert proc.popen.returncode == 0, f"the registration failed ({proc.popen.returncode}):\n{proc.tail(6000)}"
    print(f"extension with --confirm 1, then the register service: {time.time() - started:.0f} s")
    return {"workers": [ids[ip] for ip in WORKER_IPS], "log": proc.tail(10**6)}


def test_resume_from_a_new_driver_extends_confirms_and_registers(cluster, searched, extended):
    """The same search folder, grown to MORE_TRIALS trials by a driver on another machine; the new
    trials ran on the workers (worker 2 a fresh node); the best config confirmed with a fresh seed
    and the best trial registered as a model."""
    from mlflow import MlflowClient

    client = MlflowClient(cluster.stack.tracking_uri)
    record = json.loads(cluster.s3.read(f"{searched['prefix']}/search.json"))
    assert record["parent_run_id"] == searched["record"]["parent_run_id"]
    rows = read_table(cluster, f"{searched['prefix']}/trials.parquet")
    assert len(rows) == MORE_TRIALS and len({r["trial_id"] for r in rows}) == MORE_TRIALS, rows
    runs = trial_runs(client, record)
    assert len(runs) == MORE_TRIALS
    new_nodes = {r.data.tags["lpt.node"] for r in runs if r.data.tags["lpt.trial_id"] not in searched["seen_trials"]}
    assert new_nodes and new_nodes <= set(extended["workers"]), (new_nodes, extended["workers"])
    parent = client.get_run(record["parent_run_id"])
    assert parent.info.status == "FINISHED"
    best = parent.data.tags["lpt.best_trial_id"]
    assert parent.data.tags["lpt.confirmed_trial"] == best
    assert any(k.startswith("confirm_") for k in parent.data.metrics), parent.data.metrics
    model_uri = parent.data.tags["lpt.model_uri"]
    name, version = model_uri.removeprefix("models:/").rsplit("/", 1)
    registered = client.get_model_version(name, version)
    assert registered.tags.get("lpt.parent_run_id") == record["parent_run_id"], registered.tags
    assert [r for r in runs if r.data.tags.get("lpt.best") == "true"][0].data.tags["lpt.trial_id"] == best


def test_each_phase1_key_is_trained_once_across_the_cluster(cluster, searched, extended):
    """Two drivers, three worker machines (worker 2 twice): one phase-1 MLflow run per cache key,
    each epoch logged once, and the key's prompts in the bucket."""
    from mlflow import MlflowClient

    client = MlflowClient(cluster.stack.tracking_uri)
    record = searched["record"]
    runs = client.search_runs([record["experiment_id"]], "tags.`lpt.role` = 'phase1'", max_results=100)
    keys = [r.data.tags["lpt.phase1_key"] for r in runs]
    assert keys and len(keys) == len(set(keys)), keys
    epochs = yaml.safe_load((ROOT / "studies" / "profiles" / "smoke.yaml").read_text())["phase1"]["epochs"]
    for run in runs:
        assert run.info.status == "FINISHED"
        history = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(history) == list(range(1, epochs + 1)), history
    cached = {k.split("/")[2] for k in cluster.s3.keys(f"{PREFIX}/phase1-cache/") if k.endswith("/prompts.safetensors")}
    assert set(keys) <= cached, (keys, cached)
    trial_keys = {r.data.tags.get("lpt.phase1_key") for r in trial_runs(client, record)}
    assert trial_keys <= set(keys), (trial_keys, keys)


def test_report_rebuilds_from_the_storage_tag_on_another_machine(cluster, searched):
    """report.py on a machine of its own finds the search through the parent run's lpt.storage tag
    and writes the report into the bucket again (its old objects deleted first)."""
    prefix, record = searched["prefix"], searched["record"]
    s3 = cluster.s3.client()
    old = cluster.s3.keys(f"{prefix}/report/")
    assert old
    for key in old:
        s3.delete_object(Bucket=BUCKET, Key=key)
    done = cluster.host(
        "report-host", str(ROOT / "tune" / "report.py"), "--study", STUDY, "--run-id", record["parent_run_id"]
    )
    assert done.returncode == 0, done.stdout
    new = cluster.s3.keys(f"{prefix}/report/")
    assert new and {k.rsplit("/", 1)[-1] for k in new} >= {k.rsplit("/", 1)[-1] for k in old}, (old, new)


def test_no_secret_in_the_experiment_state_or_the_runs(cluster, searched):
    """Every object under the storage prefix (Tune's pickled state, the records, the caches) and
    every param and tag of the parent and trial runs: none holds the secret access key (nor the key
    id). Last: the bucket then holds all the tests above wrote."""
    from mlflow import MlflowClient

    secret, key_id = cluster.s3.secret_key.encode(), cluster.s3.access_key.encode()
    keys = cluster.s3.keys(f"{PREFIX}/")
    assert any(k.endswith("tuner.pkl") for k in keys) and any("experiment_state-" in k for k in keys), keys
    holding = [k for k in keys if secret in cluster.s3.read(k) or key_id in cluster.s3.read(k)]
    assert not holding, f"objects holding the credentials: {holding}"
    client = MlflowClient(cluster.stack.tracking_uri)
    record = searched["record"]
    runs = [client.get_run(record["parent_run_id"]), *trial_runs(client, record)]
    for run in runs:
        text = json.dumps({"params": run.data.params, "tags": run.data.tags})
        assert cluster.s3.secret_key not in text and cluster.s3.access_key not in text, run.info.run_id
    print(f"no credentials in {len(keys)} objects and {len(runs)} runs' params and tags")
