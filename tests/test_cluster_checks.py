"""A cluster search checks its storage, each node's data and the tracking store before any trial
(slow: a real two-node Ray cluster on loopback; the data comparison also on its own, with real
files). The second node runs in its own mount namespace with an empty tmpfs over the storage path:
the same path, another folder, as a node without the shared mount would have."""

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from cluster_fixtures import Proc, free_port
from smoke_search import search_argv, search_env

RAY = str(Path(sys.executable).parent / "ray")

CHECK = """
import sys, time, ray
from tune.config.plan import Plan
from tune.engine.cluster_checks import check_cluster_nodes
from tune.errors import ConfigError
from tune.search import parse_args
plan = Plan(parse_args(["--study", "prompt_pool", "--storage", sys.argv[2]]))
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
    time.sleep(0.5)
try:
    check_cluster_nodes(plan.storage, plan.profile, plan.data, plan.manifest_hash)
    print("shared")
except ConfigError as exc:
    print(f"refused: {exc}")
"""


def unshare_unavailable() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root and util-linux's unshare to give one Ray node its own mount namespace"
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    return None if probe.returncode == 0 else f"unshare --mount fails here: {probe.stderr.decode()[:200]}"


@pytest.fixture
def split_cluster(tmp_path):
    reason = unshare_unavailable()
    if reason:
        pytest.skip(reason)
    storage = tmp_path / "storage"
    storage.mkdir()
    port = free_port()
    # token auth, as the compose stack runs: nothing here depends on a ~/.ray/auth_token of the machine
    env = search_env(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    temps = [tempfile.mkdtemp(prefix="lptray-") for _ in range(2)]  # Ray's socket paths must stay short

    def node_flags(temp: str) -> str:
        ports = (
            "node-manager-port",
            "object-manager-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
        return " ".join(
            [f"--{p}={free_port()}" for p in ports]
            + ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--block", "--disable-usage-stats", f"--temp-dir={temp}"]
        )

    head = Proc(
        "ray head",
        ["sh", "-c", f"exec {RAY} start --head --port={port} --include-dashboard=false {node_flags(temps[0])}"],
        env,
        tmp_path / "head.log",
    )
    procs = [head]
    try:
        head.wait_for_line("Ray runtime started", 180)
        worker = Proc(
            "ray worker",
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs tmpfs {storage} && exec {RAY} start --address=127.0.0.1:{port} {node_flags(temps[1])}",
            ],
            env,
            tmp_path / "worker.log",
        )
        procs.append(worker)
        worker.wait_for_line("Ray runtime started", 180)
        yield f"127.0.0.1:{port}", storage, env
    finally:
        for proc in reversed(procs):
            proc.stop()
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_node_without_the_shared_folder_is_refused(split_cluster, tmp_path):
    address, storage, env = split_cluster
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, address, str(storage)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: --storage" in proc.stdout and "does not see the driver's files there" in proc.stdout, proc.stdout
    assert "mount one shared folder" in proc.stdout and "or use object storage" in proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1
    assert not list(storage.glob(".lpt-shared-check*"))  # the markers are cleaned up

    # the driver refuses a local MLflow store on a cluster before it starts anything
    search = subprocess.run(
        search_argv("--study", "prompt_pool"),
        cwd=tmp_path,
        env={**env, "RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert search.returncode == 2, search.stderr[-3000:]
    assert "a store on this machine's disk" in search.stderr and len(search.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


class Files:
    """A dataset's image list, as ``lpt_core.data.files`` keeps it: a root and paths under it."""

    def __init__(self, root: Path, paths: list[str]):
        self.root, self.paths = str(root), paths


class Data:
    def __init__(self, root: Path, paths: list[str]):
        self.train = self.val = self.test = Files(root, paths)


def test_a_node_whose_data_differs_is_named_with_how(tmp_path):
    from tune.engine.cluster_checks import DataFacts, data_problem, file_sizes

    paths = ["a/1.jpg", "a/2.jpg", "b/3.jpg"]
    driver_root, node_root = tmp_path / "driver", tmp_path / "node"
    for root in (driver_root, node_root):
        for p in paths:
            (root / p).parent.mkdir(parents=True, exist_ok=True)
            (root / p).write_bytes(b"jpeg" * 10)
    node = {"NodeManagerAddress": "10.0.0.7", "NodeID": "abcdef0123456789"}
    driver = DataFacts("m" * 64, file_sizes(Data(driver_root, paths)))
    same = DataFacts("m" * 64, file_sizes(Data(node_root, paths)))
    assert data_problem(driver, node, same) is None
    (node_root / "a/2.jpg").unlink()
    (node_root / "b/3.jpg").write_bytes(b"other")
    differs = DataFacts("m" * 64, file_sizes(Data(node_root, paths)))
    assert data_problem(driver, node, differs) == (
        "data: node 10.0.0.7 (abcdef012345) holds other data than the driver: "
        "3 files missing (e.g. test/a/2.jpg), 3 files changed (e.g. test/b/3.jpg)"
    )
    other_lists = DataFacts("n" * 64, driver.sizes)
    assert "(manifest nnnnnnnnnnnn, the driver's mmmmmmmmmmmm)" in data_problem(driver, node, other_lists)
    assert data_problem(driver, node, DataFacts(error="FileNotFoundError: /data/places: no such folder")) == (
        "data: node 10.0.0.7 (abcdef012345) cannot load the profile's data (FileNotFoundError: /data/places: "
        "no such folder)"
    )
