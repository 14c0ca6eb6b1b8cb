"""Before a cluster search starts its trials: can every node that may run a trial reach the search's
storage and does it hold the driver's data, and is the tracking store one every node can write?

Storage: the driver publishes a marker with a random token; a task pinned to each trial node reads
it back through the storage's filesystem (``tune.storage``) and publishes one of its own, which the
driver reads. An object store passes wherever its endpoint and credentials work; a local path
passes only where it is one folder on every node (NFS, a shared volume), so a plain local folder
on nodes that share nothing is refused in one line, before any trial writes there.

Data: each trial node loads the profile's data from its own copy and answers with its manifest
hash and, for image files, which are missing and which differ in size from the driver's; a node
whose data differs is refused in one line that names it and how.

Tracking: a local MLflow store (``sqlite:///``, ``file:``, a plain path) lives on the driver's disk
only, so a cluster search needs a tracking server.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tune.config.study import ProfileConfig, Resources
from tune.errors import ConfigError
from tune.names import SHARED_CHECK
from tune.storage import Location

TIMEOUT_S = 300  # a node loads the profile's data (lists, CIFAR files) once


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


def trial_nodes(resources: Resources) -> list[dict]:
    """The alive nodes that can hold one trial (the others never write to the storage)."""
    return [
        n
        for n in ray.nodes()
        if n["Alive"]
        and n["Resources"].get("CPU", 0) >= resources.cpu
        and n["Resources"].get("GPU", 0) >= resources.gpu
    ]


def file_sizes(data) -> dict[str, int]:
    """``split/path`` -> size in bytes (-1: missing) of every image file the data lists (none for
    in-memory sets, whose pixels the manifest hash covers)."""
    sizes = {}
    for split in ("train", "val", "test"):
        ds = getattr(data, split)
        if not (hasattr(ds, "paths") and hasattr(ds, "root")):
            continue
        for path in ds.paths:
            try:
                sizes[f"{split}/{path}"] = os.stat(os.path.join(ds.root, path)).st_size
            except OSError:
                sizes[f"{split}/{path}"] = -1
    return sizes


@dataclass(frozen=True)
class DataFacts:
    """What a node's copy of the profile's data is: its manifest hash and its image files' sizes
    (``file_sizes``); ``error``: why the node could not load it (then nothing else is known)."""

    manifest: str = ""
    sizes: dict[str, int] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class NodeAnswer:
    """A trial node's answer (``_node_check``, a Ray task's return): what it read at the driver's
    marker (None: nothing there), why it could not write its own (None: it did), its own marker's
    URI, and its data's facts."""

    seen: str | None
    wrote: str | None
    answer: str
    facts: DataFacts


def data_facts(profile: ProfileConfig) -> DataFacts:
    """What this node's copy of the profile's data is: manifest hash and file sizes."""
    from lpt_core.data import manifest_hash
    from tune.config.loading import profile_data

    data = profile_data(profile)
    return DataFacts(manifest_hash(data), file_sizes(data))


@ray.remote(num_cpus=0)
def _node_check(marker_uri: str, token: str, profile: ProfileConfig) -> NodeAnswer:
    """On one node: read the driver's marker, publish this node's own, describe its data."""
    marker = Location(marker_uri)
    seen: str | None
    try:
        seen = marker.read_text()
    except (OSError, ValueError) as exc:
        seen = None if isinstance(exc, FileNotFoundError) else f"error: {exc}"
    answer = marker.parent / f"{marker.name}-{ray.get_runtime_context().get_node_id()}"  # not after the query
    try:
        answer.write_text(token)
        wrote = None
    except OSError as exc:
        wrote = str(exc).strip().splitlines()[0]
    try:
        facts = data_facts(profile)
    except Exception as exc:
        facts = DataFacts(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    return NodeAnswer(seen, wrote, answer.uri, facts)


def _where(node: dict) -> str:
    return f"node {node.get('NodeManagerAddress', '?')} ({node['NodeID'][:12]})"


def storage_problem(storage: Location, node: dict, token: str, result: NodeAnswer) -> str | None:
    where = _where(node)
    if result.seen is None:
        fix = (
            "mount one shared folder (NFS, a shared volume) at this same path on every node, or use object storage"
            if storage.is_local
            else "check its endpoint and credentials there"
        )
        return f"--storage {storage}: {where} does not see the driver's files there; {fix}"
    if result.seen != token:
        return f"--storage {storage}: {where} has another folder there ({str(result.seen)[:80]})"
    if result.wrote is not None:
        return f"--storage {storage}: {where} cannot write there ({result.wrote})"
    answer = Location(result.answer)
    if not answer.is_file() or answer.read_text() != token:
        return f"--storage {storage}: what {where} writes there does not reach the driver"
    return None


def data_problem(driver: DataFacts, node: dict, result: DataFacts) -> str | None:
    where = _where(node)
    if result.error is not None:
        return f"data: {where} cannot load the profile's data ({result.error})"
    missing = sorted(k for k, v in result.sizes.items() if v < 0 and driver.sizes.get(k, -1) >= 0)
    changed = sorted(k for k, v in result.sizes.items() if v >= 0 and driver.sizes.get(k, v) != v)
    if missing or changed:
        parts = [f"{len(missing)} files missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(changed)} files changed (e.g. {changed[0]})"] if changed else []
        return f"data: {where} holds other data than the driver: {', '.join(parts)}"
    if result.manifest != driver.manifest:
        return (
            f"data: {where} holds other data than the driver (manifest {result.manifest[:12]}, "
            f"the driver's {driver.manifest[:12]}): other lists, labels or pixels"
        )
    return None


def check_cluster_nodes(storage: Location, profile: ProfileConfig, data, manifest_hash: str) -> None:
    """Refuse, in one line, a cluster where a trial node cannot share the storage or holds other
    data than the driver's ``data`` (its manifest hash ``manifest_hash``)."""
    token = secrets.token_hex(16)
    marker = storage / f"{SHARED_CHECK}-{token[:12]}"
    storage.mkdir()
    marker.write_text(token)
    nodes = trial_nodes(profile.resources)
    try:
        driver = DataFacts(manifest_hash, file_sizes(data))
        reads = [
            _node_check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                marker.uri, token, profile
            )
            for n in nodes
        ]
        results = ray.get(reads, timeout=TIMEOUT_S)
        problems = [storage_problem(storage, n, token, r) for n, r in zip(nodes, results)]
        problems += [data_problem(driver, n, r.facts) for n, r in zip(nodes, results)]
    finally:
        for loc in [marker, *(storage / f"{marker.name}-{n['NodeID']}" for n in nodes)]:
            try:
                loc.delete()
            except OSError:
                pass
    found = [p for p in problems if p]
    if found:
        raise ConfigError(found[0])
