"""Phase 1 up front: before the trials start, the driver trains every phase 1 the search can ask for.

A search's phase-1 configs are known before it starts: one per prompt length the space can sample,
with the profile's backbone, data, recipe and seed. Each one not in the cache yet is trained as a
Ray task with a trial's resources (in parallel, spread over the cluster) through the same
content-addressed cache the trials read (``tune.phase1.cache``), so a trial never holds its CPUs
or GPU idle while another trains its phase 1.
"""

from __future__ import annotations

import time

import ray
from mlflow import MlflowClient

from tune import tracking as mt
from tune import tracking_guard
from tune.config.loading import profile_data
from tune.config.search_space import prompt_lengths
from tune.phase1.cache import Phase1Cache
from tune.trial.phase1 import ensure_phase1, profile_phase1_key
from tune.trial.setup import SearchSetup, build_model

UPFRONT_METRIC = "phase1_upfront_s"  # parent-run metric: seconds the up-front step took


class Phase1Error(RuntimeError):
    """A phase-1 task failed: the message names its prompt length, key and error."""


def phase1_keys(plan) -> dict[int, str]:
    """The search's phase-1 cache keys by prompt length."""
    profile = plan.profile
    lengths = prompt_lengths(plan.study.space, profile.model.prompt_length)
    return {n: profile_phase1_key(profile, plan.manifest_hash, n, plan.data, profile.seed) for n in lengths}


def phase1_task(setup: SearchSetup, prompt_length: int) -> dict:
    """One phase 1 of the search (a Ray task): trained into the cache unless someone has already.
    ``seconds``: the task's wall time, data and model included (its cost: x a trial's resources)."""
    started = time.monotonic()
    seed = setup.profile.seed
    log = lambda msg: print(f"[phase 1, prompt_length {prompt_length}] {msg}", flush=True)
    data = profile_data(setup.profile)
    model, _ = build_model(setup, {"prompt_length": prompt_length}, data, seed)
    key, _ = ensure_phase1(setup, model, data, seed, MlflowClient(setup.tracking_uri), log)
    return {"seconds": time.monotonic() - started, **Phase1Cache(setup.cache_dir).info(key), "key": key}


def task_error(exc: BaseException) -> str:
    """A failed task's own exception in one line (Ray's error wraps it in its traceback)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def train_up_front(plan, setup: SearchSetup, client: MlflowClient, remote) -> tuple[float, float]:
    """Train the search's phase-1 configs that are not cached, as ``remote(phase1_task, profile)``
    tasks (the driver's Ray remote with a trial's resources); returns the seconds it took (also
    logged on the parent run) and the tasks' seconds summed (what it cost, in a trial's resources).
    Raises ``Phase1Error`` when a task fails; on any exception (Ctrl+C included) the tasks still
    running are cancelled."""
    keys = phase1_keys(plan)
    cache = Phase1Cache(setup.cache_dir)
    todo = [n for n, key in keys.items() if not cache.ready(key)]
    r = plan.profile.resources
    print(
        f"phase 1 up front: {len(keys)} config{'s' * (len(keys) != 1)} (prompt_length "
        f"{', '.join(map(str, keys))}), {len(keys) - len(todo)} cached, {len(todo)} to train as Ray tasks "
        f"({r.cpu:g} CPU, {r.gpu:g} GPU each)",
        flush=True,
    )
    started = time.monotonic()
    task = remote(phase1_task, plan.profile)
    pending = {task.remote(setup, n): n for n in todo}
    task_seconds = 0.0
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # a timeout: Ctrl+C gets through
            for ref in done:
                n = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:
                    raise Phase1Error(
                        f"phase 1 of prompt_length {n} (key {keys[n]}) failed: {task_error(exc)}"
                    ) from None
                task_seconds += result["seconds"]
                val = result.get("val_acc")
                print(
                    f"phase 1 prompt_length {n} ready: key {result['key']}, {result['seconds']:.0f} s"
                    + (f", val_acc {val:.2f}%" if val is not None else "")
                    + f" [{len(todo) - len(pending)}/{len(todo)}]",
                    flush=True,
                )
    finally:
        for ref in pending:
            ray.cancel(ref)
    seconds = time.monotonic() - started
    guard = tracking_guard.for_search(setup.search_dir, setup.tracking_uri)  # MLflow away: the search goes on
    guard.attempt("log phase 1's time", mt.log, client, setup.parent_run_id, metrics={UPFRONT_METRIC: seconds})
    return seconds, task_seconds
