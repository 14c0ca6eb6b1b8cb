"""The Ray Tune function trainable: one trial is phase 2 of LPT on top of cached phase-1 prompts.

``run_trial(config, setup)`` reads its phase-1 prompts from the cache (the driver trained them up
front; the run's ``phase1_wait_s`` is how long it waited for them, logged only when it did), trains phase 2 with
the sampled params, and after every epoch logs to its MLflow run (and MLflow's system metrics
throughout: ``system_metrics``) and calls ``tune.report`` with a
checkpoint of the resumable trainer state. A retried or resumed trial starts from that checkpoint
in the same MLflow run. The helpers below also serve the
driver's test evaluation of the best trial and the confirmation runs with fresh seeds.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import ray
from mlflow import MlflowClient
from ray import tune

from lpt_core import load_prompts, save_prompts
from tune import names
from tune import tracking as mt
from tune.config.loading import profile_data
from tune.names import PHASE1_STATE
from tune.storage import Location
from tune.trial.phase1 import ensure_phase1, wait_metrics
from tune.trial.report import log_trial_report
from tune.trial.setup import (
    SearchSetup,
    build_model,
    last_logged_epoch,
    run_metrics,
    seeded_trainer,
    trial_params,
)
from tune.trial.system_metrics import TrialSystemMetrics
from tune.trial.table import prompt_path
from tune.trial.test_scores import TEST_KEYS, SeedScores, score_test, scored_test


def _node_id() -> str:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return "local"


def run_trial(config: dict, setup: SearchSetup) -> None:
    """Ray Tune function trainable."""
    for name in ("ray.train", "ray.tune"):  # per-checkpoint INFO lines drown the epoch lines
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    node = _node_id()
    log = lambda msg: print(f"[{trial_id}] {msg}", flush=True)
    client = MlflowClient(setup.tracking_uri)
    seed = setup.profile.seed
    data = profile_data(setup.profile)
    model, recipe = build_model(setup, config, data, seed)
    run_id = mt.trial_run(
        client,
        setup.experiment_id,
        setup.parent_run_id,
        trial_id,
        f"trial-{trial_id}",
        trial_params(setup, config),
        {names.NODE: node, **({names.BASELINE: "true"} if config.get("baseline") else {})},
    )
    logged = last_logged_epoch(client, run_id)
    trainer = None
    system = TrialSystemMetrics(run_id, setup.tracking_uri, ray.get_gpu_ids()).start()
    try:
        key, waited = ensure_phase1(setup, model, data, seed, client, log)
        trainer = seeded_trainer(setup, model, data, 2, recipe, seed, log)
        mt.log(
            client,
            run_id,
            metrics=wait_metrics(waited),
            tags={
                names.PHASE1_KEY: key,
                names.DEVICE: str(trainer.device),  # lpt.node: set by trial_run
                names.GPU_IDS: ",".join(map(str, ray.get_gpu_ids())),
            },
        )
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                trainer.load_state(Path(folder) / PHASE1_STATE)
            log(f"resuming phase 2 at epoch {trainer.epoch} on node {node[:12]}")
            mt.log(client, run_id, tags={names.RESUMED_AT_EPOCH: trainer.epoch})

        for metrics in trainer.epochs():
            new = metrics["epoch"] > logged
            if new:
                mt.log(client, run_id, metrics=run_metrics(metrics), step=metrics["epoch"])
            if trainer.epoch == trainer.cfg.epochs:  # before the last report: Tune may end the actor right after it
                with tempfile.TemporaryDirectory() as tmp:  # published whole into the search's storage
                    local = Path(tmp) / f"{trial_id}.safetensors"
                    save_prompts(model, local, trial_id=trial_id, phase1_key=key)
                    prompt_path(setup.search_dir, trial_id).upload(local)
                    if new:
                        client.log_artifact(run_id, str(local))
                    # validation figures as artifacts of the trial run (best effort)
                    log_trial_report(client, run_id, trainer, setup.experiment_id, key, log)
            with tempfile.TemporaryDirectory() as folder:
                trainer.save_state(Path(folder) / PHASE1_STATE)
                tune.report(
                    {**metrics, "mlflow_run_id": run_id, "node": node},
                    checkpoint=tune.Checkpoint.from_directory(folder),
                )
    except FloatingPointError as exc:  # diverged: a result for this config, not a crash to retry
        reason = str(exc)
        log(f"failed: {reason}")
        mt.fail_run(client, run_id, reason)
        tune.report(
            {
                **{m: math.nan for m in setup.metrics},
                "error": reason,
                "mlflow_run_id": run_id,
                "node": node,
                "epoch": trainer.epoch if trainer else 0,
            }
        )
        return
    except Exception as exc:
        mt.fail_run(client, run_id, exc)
        raise
    finally:
        system.finish()


def evaluate_prompts(setup: SearchSetup, config: dict, prompt_file: Location) -> dict:
    """Test accuracy of a trial's saved prompts (the driver runs this on the best trial)."""
    data = profile_data(setup.profile)
    model, _ = build_model(setup, config, data, setup.profile.seed)
    with prompt_file.local_copy() as path:
        load_prompts(model, path)
    out = score_test(setup.profile, model, data)
    return {k: out[k] for k in TEST_KEYS}


def confirm_seed(setup: SearchSetup, config: dict, seed: int) -> SeedScores:
    """Retrain a config from scratch with ``seed`` (its own phase 1) and return its test accuracy
    and per-image outcome (``test_scores.scored_test``: ``SeedScores``)."""
    client = MlflowClient(setup.tracking_uri)
    log = lambda msg: print(f"[confirm seed {seed}] {msg}", flush=True)
    data = profile_data(setup.profile)
    model, recipe = build_model(setup, config, data, seed)
    ensure_phase1(setup, model, data, seed, client, log)
    seeded_trainer(setup, model, data, 2, recipe, seed, log).fit()
    return scored_test(setup.profile, model, data)
