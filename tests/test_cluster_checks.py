"""A cluster search checks its storage and tracking store before any trial (slow: a real two-node
Ray cluster on loopback). The second node runs in its own mount namespace with an empty tmpfs over
the storage path: the same path, another folder, as a node without the shared mount would have."""

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

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")

CHECK = """
import sys, time, ray
from pathlib import Path
from tune.engine.cluster_checks import check_shared_storage
from tune.errors import ConfigError
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + 120
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
    time.sleep(0.5)
try:
    check_shared_storage(Path(sys.argv[2]), {"cpu": 1, "gpu": 0})
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
    assert "refused: --storage" in proc.stdout and "does not have the folder" in proc.stdout, proc.stdout
    assert "mount one shared folder" in proc.stdout
    assert not (storage / ".lpt-shared-check").exists()  # the marker is cleaned up

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
