"""MLflow bookkeeping with the names of docs/design.md: an experiment per study, a parent run per search
(``lpt.role=study``), a child run per trial (``lpt.role=trial``), a run per phase-1 training
(``lpt.role=phase1``). Everything goes through ``MlflowClient`` and ``log_batch``.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag

from tune.errors import ServiceError  # noqa: F401 (errors.ServiceError)
from tune.names import ERROR, NODE, PARENT, PHASE1_KEY, RESUMED, ROLE, ROLE_TRIAL, TRIAL_ID  # noqa: F401 (names.ROLE ...)

MAX_BATCH = 900  # MLflow accepts 1000 metrics per log_batch


def resolve_tracking_uri(cwd: str | os.PathLike | None = None) -> str:
    """MLFLOW_TRACKING_URI, or MLflow's default local store made absolute (trials run elsewhere)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a local ``sqlite:///`` store; None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise ServiceError(f"MLFLOW_TRACKING_URI={uri}: the server answered {resp.status}")
        except urllib.error.HTTPError as exc:
            raise ServiceError(f"MLFLOW_TRACKING_URI={uri}: the server answered {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServiceError(f"MLFLOW_TRACKING_URI={uri}: cannot reach the MLflow server ({reason})") from None
    elif (db := sqlite_path(uri)) is not None:
        folder = db.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ServiceError(f"MLFLOW_TRACKING_URI={uri}: folder {folder} is missing or not writable")


class MissingStore(ServiceError):
    """A CLI that reads runs found no local store: bad input (exit 2), not an unreachable service."""


def existing_store_uri() -> str:
    """``resolve_tracking_uri`` for a CLI that reads what a search recorded: checked to answer
    (``ServiceError``), and a local store must already exist (``MissingStore``)."""
    uri = resolve_tracking_uri()
    check_tracking_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise MissingStore(f"no MLflow store at {db}: run this where the search ran, or set MLFLOW_TRACKING_URI")
    return uri


def local_artifact_root(uri: str) -> str | None:
    """For a local sqlite store, artifacts go beside the database (absolute, for every worker)."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").resolve().as_uri() if db is not None else None


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=local_artifact_root(uri))
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _str(value: Any) -> str:
    return str(value)[:6000]


def log(
    client: MlflowClient,
    run_id: str,
    metrics: dict | None = None,
    params: dict | None = None,
    tags: dict | None = None,
    step: int = 0,
) -> None:
    """Numbers (finite or not) as metrics, in batches; params and tags as strings."""
    now = int(time.time() * 1000)
    ms = [
        Metric(k, float(v), now, step)
        for k, v in (metrics or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    ps = [Param(k, _str(v)) for k, v in (params or {}).items()]
    ts = [RunTag(k, _str(v)) for k, v in (tags or {}).items()]
    for i in range(0, max(len(ms), 1), MAX_BATCH):
        client.log_batch(run_id, metrics=ms[i : i + MAX_BATCH], params=ps if i == 0 else [], tags=ts if i == 0 else [])


def latest_run(client: MlflowClient, exp_id: str, **tags: str) -> Run | None:
    """The newest run with all these tags (pass dotted names as ``**{ROLE: "study"}``), with its data."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    runs = client.search_runs([exp_id], " and ".join(clauses), max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def find_run(client: MlflowClient, exp_id: str, **tags: str) -> str | None:
    """The id of ``latest_run``."""
    run = latest_run(client, exp_id, **tags)
    return run.info.run_id if run else None


def fail_run(client: MlflowClient, run_id: str, reason: str | BaseException) -> None:
    """End a run as FAILED with ``reason`` (an exception: its type and message) in its tag ``lpt.error``."""
    if isinstance(reason, BaseException):
        reason = f"{type(reason).__name__}: {reason}"
    log(client, run_id, tags={ERROR: reason[:5000]})
    client.set_terminated(run_id, "FAILED")


def trial_run_id(client: MlflowClient, exp_id: str, parent_id: str, trial_id: str) -> str | None:
    """The run of Ray trial ``trial_id`` of the search whose parent run is ``parent_id``."""
    return find_run(client, exp_id, **{PARENT: parent_id, TRIAL_ID: trial_id})


def open_trial_runs(client: MlflowClient, exp_id: str, parent_id: str) -> dict[str, str]:
    """{Ray trial id: run id} of the search's trial runs still RUNNING."""
    where = f"tags.`{PARENT}` = '{parent_id}' and tags.`{ROLE}` = '{ROLE_TRIAL}' and attributes.status = 'RUNNING'"
    return {r.data.tags[TRIAL_ID]: r.info.run_id for r in client.search_runs([exp_id], where, max_results=50000)}


def trial_run(
    client: MlflowClient, exp_id: str, parent_id: str, trial_id: str, name: str, params: dict, tags: dict
) -> str:
    """The trial's child run: the same one again when the trial is retried or resumed."""
    run_id = trial_run_id(client, exp_id, parent_id, trial_id)
    if run_id is None:
        run = client.create_run(
            exp_id, run_name=name, tags={ROLE: ROLE_TRIAL, PARENT: parent_id, TRIAL_ID: trial_id, **tags}
        )
        run_id = run.info.run_id
        log(client, run_id, params=params)
    else:
        client.update_run(run_id, status="RUNNING")
        log(client, run_id, tags={RESUMED: "true", **tags})
    return run_id


def log_stored_file(client: MlflowClient, run_id: str, stored, artifact_path: str | None = None) -> None:
    """Log a file of the search's storage (a ``tune.storage.Location``, local or remote) as an artifact."""
    with stored.local_copy() as path:
        client.log_artifact(run_id, str(path), artifact_path)
