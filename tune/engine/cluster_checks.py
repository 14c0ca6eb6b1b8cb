"""Before a cluster search starts its trials: is the storage folder one folder on every node, and is
the tracking store one that every node can write?

The driver writes a marker with a random token into the storage folder; a task pinned to each
node that can run a trial reads it back. A node where the folder is missing, or is another
folder (a local disk that only looks like the shared one), fails the search with the fix, before
any trial writes there. A local MLflow store (``sqlite:///``, ``file:``, a plain path) lives on the
driver's disk only, so a cluster search needs a tracking server.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tune.errors import ConfigError
from tune.names import SHARED_CHECK

TIMEOUT_S = 120


def local_tracking_store(uri: str) -> bool:
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    return scheme in ("", "file", "sqlite")


def check_cluster_tracking(uri: str) -> None:
    if local_tracking_store(uri):
        raise ConfigError(
            f"MLFLOW_TRACKING_URI={uri}: a store on this machine's disk, which the other nodes "
            "cannot write; with RAY_ADDRESS set, point it at an MLflow server "
            "(e.g. http://mlflow:5000 in the compose stack)"
        )


@ray.remote(num_cpus=0)
def _read_marker(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def trial_nodes(resources: dict) -> list[dict]:
    """The alive nodes that can hold one trial (the others never write to the storage)."""
    return [
        n
        for n in ray.nodes()
        if n["Alive"]
        and n["Resources"].get("CPU", 0) >= resources["cpu"]
        and n["Resources"].get("GPU", 0) >= resources["gpu"]
    ]


def check_shared_storage(storage: Path, resources: dict) -> None:
    storage.mkdir(parents=True, exist_ok=True)
    marker = storage / SHARED_CHECK
    token = secrets.token_hex(16)
    marker.write_text(token)
    try:
        nodes = trial_nodes(resources)
        reads = [
            _read_marker.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(marker)
            )
            for n in nodes
        ]
        seen = ray.get(reads, timeout=TIMEOUT_S)
    finally:
        marker.unlink(missing_ok=True)
    for node, value in zip(nodes, seen):
        if value != token:
            where = f"node {node.get('NodeManagerAddress', '?')} ({node['NodeID'][:12]})"
            what = "does not have the folder" if value is None else "has another folder there"
            raise ConfigError(
                f"--storage {storage}: {where} {what}; mount one shared folder (NFS, a "
                "shared volume) at this same path on every node"
            )
