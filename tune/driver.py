"""The search itself, once the plan is checked: Ray, MLflow parent run, Tuner, and the wrap-up
(test accuracy of the best trial, optional confirmation seeds, the summary)."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import ray
import yaml
from mlflow import MlflowClient
from optuna.samplers import TPESampler
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from . import mlflow_tracking as mt
from . import names
from .search_report import log_search_report
from .search_space import DefineByRun
from .study_config import SHOT_KEYS, ConfigError, error_line, objective_of, phase2_epochs
from .trainable import SearchSetup, confirm_seed, evaluate_prompts, run_trial
from .names import SEARCH_FILE, TABLE_FILE
from .trial_table import (COMPLETED, TrialTable, best_row, last_line, prompt_path, read_rows,
                          status_counts, trial_row, write_table)

def start_ray(address: str | None) -> None:
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "PYTHONUNBUFFERED": "1",
           "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0"}
    os.environ.update(env)
    for passthrough in ("HF_HUB_OFFLINE", "HF_HOME", "MLFLOW_TRACKING_URI"):
        if passthrough in os.environ:
            env[passthrough] = os.environ[passthrough]
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=True)


def latest_search(storage: Path, prefix: str) -> Path | None:
    found = sorted(p for p in storage.glob(f"{prefix}-*") if (p / SEARCH_FILE).is_file())
    return found[-1] if found else None


def open_search(plan, args, client: MlflowClient, uri: str) -> tuple[Path, dict, bool]:
    """The search folder and its record (new, or the latest one for ``--resume``)."""
    prefix = f"{plan.study_name}-{plan.profile_name}"
    plan.storage.mkdir(parents=True, exist_ok=True)
    if args.resume:
        folder = latest_search(plan.storage, prefix)
        if folder is None:
            raise ConfigError(f"--resume: no search of {prefix} under {plan.storage} to resume")
        record = json.loads((folder / SEARCH_FILE).read_text())
        if record["manifest_hash"] != plan.manifest_hash or record["profile"] != plan.profile:
            raise ConfigError(f"--resume: {folder} was run with another profile or data; start a new search")
        client.update_run(record["parent_run_id"], status="RUNNING")
        return folder, record, True
    name = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = plan.storage / name
    folder.mkdir(parents=True)
    exp_id = mt.experiment_id(client, plan.study_name, uri)
    parent = client.create_run(exp_id, run_name=name, tags={names.ROLE: names.ROLE_STUDY, names.SEARCH: name,
                                                            names.STORAGE: str(folder)})
    b = plan.study["budget"]
    mt.log(client, parent.info.run_id, params={
        "study": plan.study_name, "profile": plan.profile_name, "trials": b["trials"],
        "concurrency": b["concurrency"], "objective": json.dumps(plan.study["objective"]),
        "sampler_seed": plan.study["seed"], "space": json.dumps(plan.study["space"]),
        "data": plan.profile["data"]["name"], "backbone": plan.profile["backbone"]["name"],
        "manifest_hash": plan.manifest_hash})
    record = {"name": name, "study": plan.study_name, "profile_name": plan.profile_name,
              "profile": plan.profile, "study_config": plan.study, "manifest_hash": plan.manifest_hash,
              "experiment_id": exp_id, "parent_run_id": parent.info.run_id, "tracking_uri": uri}
    (folder / SEARCH_FILE).write_text(json.dumps(record, indent=2, default=str))
    (folder / names.PROFILE_FILE).write_text(yaml.safe_dump(plan.profile, sort_keys=False))
    client.log_artifact(parent.info.run_id, str(folder / names.PROFILE_FILE))
    return folder, record, False


def make_tuner(plan, folder: Path, setup: SearchSetup, client: MlflowClient, resume: bool) -> tune.Tuner:
    study, profile = plan.study, plan.profile
    metrics, modes = objective_of(study["objective"])
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"cpu": profile["resources"]["cpu"], "gpu": profile["resources"]["gpu"]})
    epochs = phase2_epochs(profile)
    if resume:
        if tune.Tuner.can_restore(str(folder)):  # with the trial table callback it was started with
            return tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=True)
        print(f"{folder}: the search stopped before Tune saved its state; starting its trials again", flush=True)
        (folder / TABLE_FILE).unlink(missing_ok=True)  # rows of trials that run again; a copied callback re-reads it
    table = TrialTable(folder / TABLE_FILE, list(study["space"]), epochs, client, study["budget"]["trials"], metrics[0])
    single = len(metrics) == 1
    searcher = OptunaSearch(space=DefineByRun(study["space"], profile["model"], plan.depth),
                            metric=metrics[0] if single else metrics, mode=modes[0] if single else modes,
                            sampler=TPESampler(seed=study["seed"]))
    es = study["early_stopping"]
    scheduler = (ASHAScheduler(time_attr="epoch", metric=metrics[0], mode=modes[0], max_t=epochs,
                               grace_period=es["grace_period"], reduction_factor=es["reduction_factor"])
                 if es["enabled"] else FIFOScheduler())
    run_config = tune.RunConfig(
        name=folder.name, storage_path=str(folder.parent),
        failure_config=tune.FailureConfig(max_failures=study["budget"]["max_failures"]),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=[table], verbose=0)
    return tune.Tuner(trainable, run_config=run_config, tune_config=tune.TuneConfig(
        search_alg=ConcurrencyLimiter(searcher, max_concurrent=study["budget"]["concurrency"]),
        scheduler=scheduler, num_samples=study["budget"]["trials"]))


def on_resources(fn, profile: dict):
    r = profile["resources"]
    return ray.remote(num_cpus=r["cpu"], num_gpus=r["gpu"], max_retries=2)(fn)


def pareto(rows: list[dict], metrics: list[str], modes: list[str]) -> list[str]:
    done = [r for r in rows if r["status"] == COMPLETED]
    signed = lambda r: [(1 if m == "max" else -1) * r[k] for k, m in zip(metrics, modes)]

    def dominated(a):
        return any(all(x >= y for x, y in zip(signed(b), signed(a))) and signed(b) != signed(a) for b in done)
    return [r["trial_id"] for r in done if not dominated(r)]


def check_resources(resources: dict, local: bool) -> None:
    """One trial must fit on one node, or Tune leaves it pending for ever: a local Ray that cannot
    hold one is an input error; a cluster may still get such a node, so it only warns."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if any(n.get("CPU", 0) >= resources["cpu"] and n.get("GPU", 0) >= resources["gpu"] for n in nodes):
        return
    have = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes)
    message = (f"resources: a trial asks for {resources['cpu']:g} CPU and {resources['gpu']:g} GPU "
               f"on one node; the Ray nodes have {have or 'nothing'}")
    if local:
        raise ConfigError(f"{message} (lower them with --set resources.cpu=... resources.gpu=...)")
    print(f"warning: {message}; trials wait until such a node joins", flush=True)


def run_search(plan, args, uri: str, address: str | None) -> int:
    start_ray(address)
    try:
        check_resources(plan.profile["resources"], local=address is None)
        return run_on_ray(plan, args, uri)
    finally:
        ray.shutdown()


def run_on_ray(plan, args, uri: str) -> int:
    client = MlflowClient(uri)
    folder, record, resume = open_search(plan, args, client, uri)
    parent_id = record["parent_run_id"]
    metrics, modes = objective_of(plan.study["objective"])
    setup = SearchSetup(profile_name=plan.profile_name, profile=plan.profile,
                        manifest_hash=plan.manifest_hash, search_dir=str(folder),
                        cache_dir=str(plan.storage / names.PHASE1_CACHE), tracking_uri=uri,
                        experiment_id=record["experiment_id"], parent_run_id=parent_id,
                        metrics=tuple(metrics))
    print(plan.describe(), flush=True)
    print(f"search folder: {folder}\nMLflow: {uri} (experiment '{plan.study_name}', parent run {parent_id})", flush=True)
    started = time.time()
    try:
        grid = make_tuner(plan, folder, setup, client, resume).fit()
        rows = read_rows(folder / TABLE_FILE)
        epochs = phase2_epochs(plan.profile)
        for result in grid:  # a trial that ended without a row (the search was killed right after it)
            tid = (result.metrics or {}).get("trial_id")
            if tid and tid not in rows:
                error = last_line(result.error) if result.error else None
                rows[tid] = trial_row(tid, result.config or {}, list(plan.study["space"]), result.metrics, epochs, error)
        rows = list(rows.values())
        write_table(rows, folder / TABLE_FILE)
        wrap_up(plan, args, setup, client, folder, rows, metrics, modes, time.time() - started)
    except KeyboardInterrupt:
        client.set_terminated(parent_id, "KILLED")
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    except Exception as exc:
        mt.fail_run(client, parent_id, exc)
        print(f"error: the search failed: {error_line(exc)}", file=sys.stderr)
        return 1
    return 0 if any(r["status"] == COMPLETED for r in rows) else 1


def wrap_up(plan, args, setup: SearchSetup, client: MlflowClient, folder: Path, rows: list[dict],
            metrics: list[str], modes: list[str], seconds: float) -> None:
    parent_id = setup.parent_run_id
    counts = status_counts(rows)
    summary = {"trials_" + k: v for k, v in counts.items()}
    summary["search_wall_s"] = seconds
    best = best_row(rows, metrics[0], modes[0])
    lines = [f"\n{len(rows)} trials: {counts['completed']} completed, {counts['early_stopped']} stopped early "
             f"by ASHA, {counts['failed']} failed ({seconds:.0f} s)"]
    if best is not None:
        config = {p: best[p] for p in plan.study["space"]}
        prompt_file = prompt_path(folder, best["trial_id"])
        test = ray.get(on_resources(evaluate_prompts, plan.profile).remote(setup, config, str(prompt_file)))
        mt.log(client, best["mlflow_run_id"], metrics=test, tags={names.BEST: "true"})
        summary.update({f"best_{k}": v for k, v in {**{m: best[m] for m in metrics}, **test}.items()})
        client.set_tag(parent_id, names.BEST_TRIAL_ID, best["trial_id"])
        lines += [f"best trial {best['trial_id']}: " + ", ".join(f"{k}={v}" for k, v in config.items()),
                  "  validation: " + shot_line(best, "val_"),
                  "  test:       " + shot_line(test, "test_"),
                  f"  prompts:    {prompt_file}"]
        if len(metrics) > 1:
            front = pareto(rows, metrics, modes)
            client.set_tag(parent_id, names.PARETO_TRIALS, ",".join(front))
            lines.append(f"  Pareto front on {', '.join(metrics)}: {', '.join(front)}")
        if args.confirm:
            seeds = [plan.profile["seed"] + 1000 + i for i in range(args.confirm)]
            print(f"confirming the best config with seeds {seeds} ...", flush=True)
            task = on_resources(confirm_seed, plan.profile)
            results = ray.get([task.remote(setup, config, s) for s in seeds])
            keys = [f"test_{m}" for m in SHOT_KEYS]
            for k in keys:
                values = [r[k] for r in results]
                summary[f"confirm_{k}_mean"] = statistics.fmean(values)
                summary[f"confirm_{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            lines.append(f"  confirmed over {len(seeds)} seeds: " + ", ".join(
                f"{k.removeprefix('test_')} {summary[f'confirm_{k}_mean']:.2f} ± {summary[f'confirm_{k}_std']:.2f}"
                for k in keys))
    else:
        lines.append("no trial completed: see the table's error column and the trials' MLflow runs")
    mt.log(client, parent_id, metrics=summary)
    client.log_artifact(parent_id, str(folder / TABLE_FILE))
    log_search_report(client, parent_id, folder)  # figures and summary.html
    client.set_terminated(parent_id, "FINISHED")
    lines += [f"table:  {folder / TABLE_FILE}",
              f"MLflow: mlflow ui --backend-store-uri {setup.tracking_uri}  (experiment '{plan.study_name}')"
              if setup.tracking_uri.startswith("sqlite") else f"MLflow: {setup.tracking_uri} (experiment '{plan.study_name}')"]
    print("\n".join(lines), flush=True)


def shot_line(values: dict, prefix: str) -> str:
    get = lambda k: values.get(f"{prefix}{k}", math.nan)
    return (f"{get('acc'):.2f}% (many {get('many_acc'):.2f} / medium {get('medium_acc'):.2f} / "
            f"few {get('few_acc'):.2f})")
