"""Starting Ray and the Tuner of a search: the new search folder and its parent run, the Tuner
(trainable, searcher, scheduler, stoppers), resources."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import optuna
import ray
import yaml
from mlflow import MlflowClient
from ray import tune

from tune import names
from tune import tracking as mt
from tune.config.loading import objective_of
from tune.config.samplers import describe_sampler, sampler_settings
from tune.config.search_space import baseline_config
from tune.config.study import ProfileConfig, Resources
from tune.engine import budget_gate as gate
from tune.engine.optuna_storage import PublishCopy, fail_unfinished, open_storage, search_study
from tune.engine.progress import SearchProgress
from tune.engine.search_lock import SearchLock
from tune.engine.searcher import enqueue_baseline, make_scheduler, make_searcher
from tune.errors import ConfigError
from tune.names import TABLE_FILE
from tune.record import RUNNING, RunPart, SearchRecord, save_record
from tune.storage import Location
from tune.tracking_retry import apply_retry_settings
from tune.trial.setup import SearchSetup
from tune.trial.table import TrialTable, read_rows, write_table
from tune.trial.trainable import run_trial

QUIET_ENV = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # no "View run ..." line per run


def start_ray(address: str | None) -> None:
    env = {
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        "PYTHONUNBUFFERED": "1",
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
        **QUIET_ENV,
        **apply_retry_settings(),  # every trial retries MLflow as the driver does
    }
    os.environ.update(env)
    for passthrough in ("HF_HUB_OFFLINE", "HF_HOME", "MLFLOW_TRACKING_URI"):
        if passthrough in os.environ:
            env[passthrough] = os.environ[passthrough]
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # "local": a Ray of this search's own, never a cluster someone else started on this machine.
        # Ray 2.60 turns token authentication on for a cluster that ray.init starts (unless
        # RAY_AUTH_MODE says otherwise) and warns on every search that it did: docs/searching.md
        # says so once instead (the token is ~/.ray/auth_token, made on first use)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            runtime_env={"env_vars": env},
            log_to_driver=True,
        )


def new_search(plan, client: MlflowClient, uri: str, lock: SearchLock) -> tuple[Location, SearchRecord, str]:
    """A new search folder (``lock`` taken on it before its record exists), its parent run and its record."""
    prefix = f"{plan.study_name}-{plan.profile_name}"
    name = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = plan.storage / name
    folder.mkdir()
    lock.take(folder)
    exp_id = mt.experiment_id(client, plan.study_name, uri)
    parent = client.create_run(
        exp_id, run_name=name, tags={names.ROLE: names.ROLE_STUDY, names.SEARCH: name, names.STORAGE: folder.uri}
    )
    study, b = plan.study.to_dict(), plan.study.budget  # the study as search.json and MLflow hold it
    mt.log(
        client,
        parent.info.run_id,
        params={
            "study": plan.study_name,
            "profile": plan.profile_name,
            "trials": b.trials,
            "concurrency": b.concurrency,
            "objective": json.dumps(study["objective"]),
            "sampler_seed": plan.study.seed,
            "space": json.dumps(study["space"]),
            "sampler": describe_sampler(sampler_settings(plan.study, b.trials), b.trials),
            "baseline": json.dumps(plan.baseline) if plan.baseline else "off",
            "data": plan.profile.data.name,
            "backbone": plan.profile.backbone.name,
            "manifest_hash": plan.manifest_hash,
        },
    )
    record = SearchRecord(
        name=name,
        study=plan.study_name,
        profile_name=plan.profile_name,
        profile=plan.profile,
        study_config=plan.study,
        manifest_hash=plan.manifest_hash,
        experiment_id=exp_id,
        parent_run_id=parent.info.run_id,
        tracking_uri=uri,
        state=RUNNING,
        runs=[RunPart(dir=".", trials=b.trials, rows_before=[])],
    )
    save_record(folder, record)
    with tempfile.TemporaryDirectory() as tmp:
        profile_file = Path(tmp) / names.PROFILE_FILE
        profile_file.write_text(yaml.safe_dump(plan.profile.to_dict(), sort_keys=False))
        (folder / names.PROFILE_FILE).upload(profile_file)
        client.log_artifact(parent.info.run_id, str(profile_file))
    return folder, record, "new"


def make_tuner(
    plan,
    folder: Location,
    run: RunPart,
    setup: SearchSetup,
    client: MlflowClient,
    restore: bool,
    budget: int,
    record: SearchRecord,
) -> tune.Tuner:
    """The Tuner of one Tune run of the search: the first (``run.dir == "."``, the search folder
    itself) or an extension (``extend-N`` inside it). Every run's sampler works on the search's
    one Optuna study (``record.optuna_study``), so an extension starts from every earlier trial.
    ``restore`` continues the run's unfinished trials from their checkpoints."""
    study, profile = plan.study, plan.profile
    metrics, modes = objective_of(study.objective)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), {"cpu": profile.resources.cpu, "gpu": profile.resources.gpu}
    )
    epochs = plan.phase2.epochs
    path = folder if run.dir == "." else folder / run.dir
    table_path = folder / TABLE_FILE
    tune_path, tune_fs = path.tune_storage()  # Tune's own folder, on the search's filesystem
    if restore:
        if tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs):  # its callbacks and searcher as started
            return tune.Tuner.restore(
                tune_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=tune_fs
            )
        print(f"{path}: the search stopped before Tune saved its state; starting its trials again", flush=True)
        earlier = read_rows(table_path)  # keep the rows of earlier runs; this run's trials run again
        write_table([r for tid, r in earlier.items() if tid in run.rows_before], table_path)
    prior = [r for tid, r in read_rows(table_path).items() if tid in run.rows_before]
    params = list(study.space.params())
    stopper = gate.BudgetStopper(folder)  # the budget's pieces read the search folder (and again when restored)
    table = TrialTable(
        table_path,
        params,
        epochs,
        client,
        budget,
        metrics[0],
        prior,
        (setup.experiment_id, setup.parent_run_id),
        profile.resources,
        stopper,
    )
    progress = SearchProgress(budget, epochs, metrics[0], modes[0], params, prior, meter=gate.BudgetMeter(folder))
    storage = open_storage(record.optuna_storage)
    ot_study = search_study(storage, record.optuna_study, modes)
    fail_unfinished(ot_study)  # trials of a run that starts again
    if study.baseline.enabled:
        enqueue_baseline(ot_study, baseline_config(study.space, profile.model, profile.phase2))
    searcher = make_searcher(
        study,
        profile.model,
        plan.depth,
        epochs,
        metrics,
        modes,
        sampler_settings(study, budget),
        storage=storage,
        study_name=record.optuna_study,
        seed_offset=len(prior),
    )
    run_config = tune.RunConfig(
        name=path.name,
        storage_path=path.parent.tune_storage()[0],
        storage_filesystem=tune_fs,
        failure_config=tune.FailureConfig(max_failures=study.budget.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[table, progress, PublishCopy(folder, record.optuna_storage)],
        stop=stopper,
        verbose=0,
    )
    return tune.Tuner(
        trainable,
        run_config=run_config,
        tune_config=tune.TuneConfig(
            search_alg=gate.BudgetSearcher(searcher, folder),
            scheduler=make_scheduler(study, plan.phase2, metrics[0], modes[0], len(plan.data.val)),
            num_samples=run.trials,
        ),
    )


def on_resources(fn, profile: ProfileConfig):
    r = profile.resources
    return ray.remote(num_cpus=r.cpu, num_gpus=r.gpu, max_retries=2)(fn)


def pareto(storage: str, study_name: str) -> list[str]:
    """The Tune trial ids of the Pareto front: Optuna's ``best_trials`` of the search's study
    ``study_name`` in ``storage`` (its trials that ran every epoch; those ASHA stopped are PRUNED)."""
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    return sorted(
        t.user_attrs[names.OPTUNA_TRIAL_ID] for t in study.best_trials if names.OPTUNA_TRIAL_ID in t.user_attrs
    )


def check_resources(resources: Resources, local: bool) -> None:
    """One trial must fit on one node, or Tune leaves it pending for ever: a local Ray that cannot
    hold one is an input error; a cluster may still get such a node, so it only warns."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if any(n.get("CPU", 0) >= resources.cpu and n.get("GPU", 0) >= resources.gpu for n in nodes):
        return
    have = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes)
    message = (
        f"resources: a trial asks for {resources.cpu:g} CPU and {resources.gpu:g} GPU "
        f"on one node; the Ray nodes have {have or 'nothing'}"
    )
    if local:
        raise ConfigError(f"{message} (lower them with --set resources.cpu=... resources.gpu=...)")
    print(f"warning: {message}; trials wait until such a node joins", flush=True)


def search_setup(plan, folder: Location, record: SearchRecord, uri: str) -> SearchSetup:
    return SearchSetup(
        profile_name=plan.profile_name,
        profile=plan.profile,
        manifest_hash=plan.manifest_hash,
        search_dir=folder.uri,
        cache_dir=(plan.storage / names.PHASE1_CACHE).uri,
        tracking_uri=uri,
        experiment_id=record.experiment_id,
        parent_run_id=record.parent_run_id,
        metrics=tuple(objective_of(plan.study.objective)[0]),
    )
