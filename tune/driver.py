"""The search itself, once the plan is checked: Ray, MLflow parent run, Tuner, and the wrap-up
(test accuracy of the best trial, optional confirmation seeds, the summary)."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import ray
import yaml
from mlflow import MlflowClient
import optuna
from ray import tune

from . import budget as cost
from . import budget_gate as gate
from . import mlflow_tracking as mt
from . import names
from .cluster_checks import check_shared_storage
from .model_registry import RegisterError, model_name, register_best
from . import validation
from .baseline_gain import baseline_row, confirm_summary, shots, validation_gain, with_se
from .validation import SE_METRIC, SIZE_METRIC, binomial_se
from .phase1_upfront import train_up_front
from .progress import SearchProgress
from .optuna_storage import fail_unfinished, open_storage, search_study, storage_url
from .samplers import describe_sampler, sampler_settings
from .search_lock import SearchLock
from .search_report import build_study, log_search_report
from .search_space import baseline_config
from .searcher import enqueue_baseline, make_scheduler, make_searcher
from .stop_signals import StopSignals
from .study_config import ConfigError, StudyConfig, error_line, objective_of
from .trainable import SearchSetup, confirm_seed, evaluate_prompts, run_trial
from .names import SEARCH_FILE, TABLE_FILE
from .trial_table import (BUDGET_STOPPED, COMPLETED, FAILED, INTERRUPTED, TrialTable, best_row, close_trial_run,
                          last_line, prompt_path, read_rows, status_counts, trial_row, write_table)

RUNNING, INTERRUPTED_STATE, FINISHED = "running", "interrupted", "finished"  # search.json's "state"
EXIT_INTERRUPTED = 130
QUIET_ENV = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}  # no "View run ..." line per run


def start_ray(address: str | None) -> None:
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "PYTHONUNBUFFERED": "1",
           "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0", **QUIET_ENV}
    os.environ.update(env)
    for passthrough in ("HF_HUB_OFFLINE", "HF_HOME", "MLFLOW_TRACKING_URI"):
        if passthrough in os.environ:
            env[passthrough] = os.environ[passthrough]
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # "local": a Ray of this search's own, never a cluster someone else started on this machine
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=True)


def latest_search(storage: Path, prefix: str) -> Path | None:
    found = sorted(p for p in storage.glob(f"{prefix}-*") if (p / SEARCH_FILE).is_file())
    return found[-1] if found else None


def save_record(folder: Path, record: dict) -> None:
    tmp = folder / f".{SEARCH_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, folder / SEARCH_FILE)


def _plain(value):
    """As ``search.json`` holds it (a JSON round trip), so that stored and new configs compare."""
    return json.loads(json.dumps(value, default=str))


def first_difference(old, new, path: str = "") -> str | None:
    """The first key path where two configs differ, with both values; None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if old == new else f"{path} (the search has {old!r}, now {new!r})"


def with_defaults(study: dict) -> dict:
    """A stored study config with the keys added since it was stored, at their defaults."""
    return StudyConfig.model_validate(study).to_dict(order=list(study["space"]))


def resume_mode(plan, args, record: dict, folder: Path) -> str:
    """``resume`` (finish the budget), ``extend`` (more trials) or ``finished``; a search that
    differs from the one in ``folder`` is refused, since its trials would mix two searches."""
    if record["manifest_hash"] != plan.manifest_hash:
        raise ConfigError(f"--resume: {folder.name} was run on other data (manifest "
                          f"{record['manifest_hash'][:12]}, now {plan.manifest_hash[:12]}); start a new search")
    diff = first_difference(_plain(record["profile"]), _plain(plan.profile))
    if diff:
        raise ConfigError(f"--resume: profile {diff} in {folder.name}; start a new search without --resume")
    cost.resumed_budget(plan.study, record["study_config"]["budget"], plan.budget_given)
    stored, wanted = _plain(with_defaults(record["study_config"])), _plain(plan.study)
    budget = stored["budget"]["trials"]
    asked = budget if args.trials is None else args.trials  # the search's own budget unless --trials
    free = dict.fromkeys(("trials", *cost.BUDGET_KEYS))  # what a resumed search may change (cost.resumed_budget)
    diff = first_difference({**stored, "budget": {**stored["budget"], **free}},
                            {**wanted, "budget": {**wanted["budget"], **free}})
    if diff:
        raise ConfigError(f"--resume: study {diff} in {folder.name}; start a new search without --resume")
    if asked < budget:
        raise ConfigError(f"--trials {asked}: the search in {folder.name} has a budget of {budget}; resume it "
                          f"as it is (no --trials), or extend it with --trials N (N > {budget})")
    plan.study["budget"]["trials"] = asked
    mode = "extend" if asked > budget else "finished" if record.get("state") == FINISHED else "resume"
    return cost.resume_mode(mode, record, plan.study, folder)


def find_resumed(plan, args) -> tuple[Path, dict, str]:
    """For ``--resume``: the latest search of this study and profile, its record and what to do
    (``resume_mode``). Read before Ray starts, so that a refusal is one line and costs nothing."""
    prefix = f"{plan.study_name}-{plan.profile_name}"
    folder = latest_search(plan.storage, prefix) if plan.storage.is_dir() else None
    if folder is None:
        raise ConfigError(f"--resume: no search of {prefix} under {plan.storage} to resume")
    record = json.loads((folder / SEARCH_FILE).read_text())
    record.setdefault("runs", [{"dir": ".", "trials": record["study_config"]["budget"]["trials"], "rows_before": []}])
    return folder, record, resume_mode(plan, args, record, folder)


def new_search(plan, client: MlflowClient, uri: str, lock: SearchLock) -> tuple[Path, dict, str]:
    """A new search folder (``lock`` taken on it before its record exists), its parent run and its record."""
    prefix = f"{plan.study_name}-{plan.profile_name}"
    plan.storage.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = plan.storage / name
    folder.mkdir(parents=True)
    lock.take(folder)
    exp_id = mt.experiment_id(client, plan.study_name, uri)
    parent = client.create_run(exp_id, run_name=name, tags={names.ROLE: names.ROLE_STUDY, names.SEARCH: name,
                                                            names.STORAGE: str(folder)})
    b = plan.study["budget"]
    mt.log(client, parent.info.run_id, params={
        "study": plan.study_name, "profile": plan.profile_name, "trials": b["trials"],
        "concurrency": b["concurrency"], "objective": json.dumps(plan.study["objective"]),
        "sampler_seed": plan.study["seed"], "space": json.dumps(plan.study["space"]),
        "sampler": describe_sampler(sampler_settings(plan.study, b["trials"]), b["trials"]),
        "baseline": json.dumps(plan.baseline) if plan.baseline else "off",
        "data": plan.profile["data"]["name"], "backbone": plan.profile["backbone"]["name"],
        "manifest_hash": plan.manifest_hash})
    record = {"name": name, "study": plan.study_name, "profile_name": plan.profile_name,
              "profile": plan.profile, "study_config": plan.study, "manifest_hash": plan.manifest_hash,
              "experiment_id": exp_id, "parent_run_id": parent.info.run_id, "tracking_uri": uri,
              "state": RUNNING, "runs": [{"dir": ".", "trials": b["trials"], "rows_before": []}]}
    save_record(folder, record)
    (folder / names.PROFILE_FILE).write_text(yaml.safe_dump(plan.profile, sort_keys=False))
    client.log_artifact(parent.info.run_id, str(folder / names.PROFILE_FILE))
    return folder, record, "new"


def make_tuner(plan, folder: Path, run: dict, setup: SearchSetup, client: MlflowClient, restore: bool,
               budget: int, record: dict) -> tune.Tuner:
    """The Tuner of one Tune run of the search: the first (``run["dir"] == "."``, the search folder
    itself) or an extension (``extend-N`` inside it). Every run's sampler works on the search's
    one Optuna study (``record["optuna_study"]``), so an extension starts from every earlier trial.
    ``restore`` continues the run's unfinished trials from their checkpoints."""
    study, profile = plan.study, plan.profile
    metrics, modes = objective_of(study["objective"])
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"cpu": profile["resources"]["cpu"], "gpu": profile["resources"]["gpu"]})
    epochs = plan.phase2.epochs
    path = folder / run["dir"]
    table_path = folder / TABLE_FILE
    if restore:
        if tune.Tuner.can_restore(str(path)):  # with the callbacks and the searcher it was started with
            return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
        print(f"{path}: the search stopped before Tune saved its state; starting its trials again", flush=True)
        earlier = read_rows(table_path)  # keep the rows of earlier runs; this run's trials run again
        write_table([r for tid, r in earlier.items() if tid in run["rows_before"]], table_path)
    prior = [r for tid, r in read_rows(table_path).items() if tid in run["rows_before"]]
    params = list(study["space"])
    stopper = gate.BudgetStopper(folder)  # the budget's pieces read the search folder (and again when restored)
    table = TrialTable(table_path, params, epochs, client, budget, metrics[0], prior,
                       (setup.experiment_id, setup.parent_run_id), profile["resources"], stopper)
    progress = SearchProgress(budget, epochs, metrics[0], modes[0], params, prior,
                              meter=gate.BudgetMeter(folder))
    storage = open_storage(record["optuna_storage"])
    ot_study = search_study(storage, record["optuna_study"], modes)
    fail_unfinished(ot_study)  # trials of a run that starts again
    if study["baseline"]["enabled"]:
        enqueue_baseline(ot_study, baseline_config(study["space"], profile["model"], profile["phase2"]))
    searcher = make_searcher(study, profile["model"], plan.depth, epochs, metrics, modes,
                             sampler_settings(study, budget), storage=storage,
                             study_name=record["optuna_study"], seed_offset=len(prior))
    run_config = tune.RunConfig(
        name=path.name, storage_path=str(path.parent),
        failure_config=tune.FailureConfig(max_failures=study["budget"]["max_failures"]),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1), callbacks=[table, progress], stop=stopper,
        verbose=0)
    return tune.Tuner(trainable, run_config=run_config, tune_config=tune.TuneConfig(
        search_alg=gate.BudgetSearcher(searcher, folder),
        scheduler=make_scheduler(study, plan.phase2, metrics[0], modes[0]),
        num_samples=run["trials"]))


def keep_optuna_study(plan, client: MlflowClient, folder: Path, record: dict) -> None:
    """Name the search's Optuna storage and study in its record and parent run (once). A search
    started before the study was kept gets one now, holding the trials of its table."""
    if "optuna_study" in record:
        return
    record.update(optuna_storage=storage_url(folder), optuna_study=record["name"])
    rows = list(read_rows(folder / TABLE_FILE).values())
    if rows:
        metrics, modes = objective_of(plan.study["objective"])
        study = search_study(open_storage(record["optuna_storage"]), record["optuna_study"], modes)
        study.add_trials(build_study(rows, plan.study["space"], metrics, modes).trials)
    client.set_tag(record["parent_run_id"], names.OPTUNA_STORAGE, record["optuna_storage"])
    client.set_tag(record["parent_run_id"], names.OPTUNA_STUDY, record["optuna_study"])
    save_record(folder, record)


def on_resources(fn, profile: dict):
    r = profile["resources"]
    return ray.remote(num_cpus=r["cpu"], num_gpus=r["gpu"], max_retries=2)(fn)


def pareto(record: dict) -> list[str]:
    """The Tune trial ids of the Pareto front: Optuna's ``best_trials`` of the search's study (its
    trials that ran every epoch; those ASHA stopped are PRUNED)."""
    study = optuna.load_study(study_name=record["optuna_study"], storage=open_storage(record["optuna_storage"]))
    return sorted(t.user_attrs[names.OPTUNA_TRIAL_ID] for t in study.best_trials
                  if names.OPTUNA_TRIAL_ID in t.user_attrs)


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
    resumed = find_resumed(plan, args) if args.resume else None
    if resumed and resumed[2] == "finished" and not args.confirm:
        return say_finished(plan, *resumed[:2])
    with SearchLock() as lock:
        if resumed:
            lock.take(resumed[0])  # a search another driver runs is refused here, before Ray starts
        start_ray(address)
        try:
            check_resources(plan.profile["resources"], local=address is None)
            if address:
                check_shared_storage(plan.storage, plan.profile["resources"])
            if resumed and resumed[2] == "finished":
                return confirm_finished(plan, args, uri, *resumed[:2])
            return run_on_ray(plan, args, uri, resumed, lock)
        finally:
            ray.shutdown()


def resume_command(args) -> str:
    """The command line that continues this search: its own study, profile, overrides and storage."""
    q = shlex.quote
    parts = ["python tune/search.py", f"--study {q(args.study)}", f"--profile {q(args.profile)}",
             *(f"--set {q(s)}" for s in args.set), *([f"--storage {q(args.storage)}"] if args.storage else []),
             "--resume"]
    return " ".join(parts)


def collect_rows(plan, client: MlflowClient, folder: Path, grids: list, interrupted: bool) -> list[dict]:
    """The table's rows, plus a row for each trial that ended without one: the search was killed
    right after it, or (``interrupted``) it was still running when the search stopped."""
    rows = read_rows(folder / TABLE_FILE)
    epochs = plan.phase2.epochs
    for grid in grids:
        for result in grid:
            tid = (result.metrics or {}).get("trial_id")
            if tid and tid not in rows:
                error = last_line(result.error) if result.error and not interrupted else None
                rows[tid] = trial_row(tid, result.config or {}, list(plan.study["space"]), result.metrics,
                                      epochs, error, interrupted=interrupted, resources=plan.profile["resources"])
                if rows[tid]["status"] != INTERRUPTED:  # it ended, but its end reached no callback
                    close_trial_run(client, rows[tid])
    rows = list(rows.values())
    write_table(rows, folder / TABLE_FILE)
    return rows


def stop_interrupted(plan, args, client: MlflowClient, folder: Path, record: dict, rows: list[dict],
                     signal_name: str) -> int:
    """A stopped search: its unfinished trials' runs and the parent run end KILLED, the record
    says ``interrupted``, and one line says how to continue."""
    for row in (r for r in rows if r["status"] == INTERRUPTED):
        # a trial stopped before its first epoch has reported no run id: find its run by its tags
        row["mlflow_run_id"] = row.get("mlflow_run_id") or mt.trial_run_id(
            client, record["experiment_id"], record["parent_run_id"], row["trial_id"])
        if row["mlflow_run_id"]:
            client.set_tag(row["mlflow_run_id"], names.STATUS, INTERRUPTED)
            client.set_terminated(row["mlflow_run_id"], "KILLED")
    write_table(rows, folder / TABLE_FILE)
    mt.log(client, record["parent_run_id"], metrics=cost.search_spent(record, rows),
           tags={names.INTERRUPTED: signal_name})
    client.set_terminated(record["parent_run_id"], "KILLED")
    save_record(folder, {**record, "state": INTERRUPTED_STATE})
    counts = status_counts(rows)
    ended = sum(counts.values()) - counts[INTERRUPTED]
    print(f"interrupted ({signal_name}): {ended} of {record['study_config']['budget']['trials']} trials ended, "
          f"{counts[INTERRUPTED]} stopped mid-way keep their last epoch; continue with: "
          f"{resume_command(args)}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def say_finished(plan, folder: Path, record: dict) -> int:
    budget = record["study_config"]["budget"]["trials"]
    counts = status_counts(list(read_rows(folder / TABLE_FILE).values()))
    ended = cost.finished_line(record, plan.study, folder)
    print(f"{folder.name} is finished: {budget} trials ({counts[COMPLETED]} completed"
          + (f"; {ended}" if ended else "") + f"). See its summary with python tune/report.py --study "
          f"{plan.study_name}; extend it with --resume --trials N (N > {budget}), or confirm its best on test "
          f"with --resume --confirm N", flush=True)
    return 0


def search_setup(plan, folder: Path, record: dict, uri: str) -> SearchSetup:
    return SearchSetup(profile_name=plan.profile_name, profile=plan.profile, manifest_hash=plan.manifest_hash,
                       search_dir=str(folder), cache_dir=str(plan.storage / names.PHASE1_CACHE), tracking_uri=uri,
                       experiment_id=record["experiment_id"], parent_run_id=record["parent_run_id"],
                       metrics=tuple(objective_of(plan.study["objective"])[0]))


def confirm_finished(plan, args, uri: str, folder: Path, record: dict) -> int:
    """``--resume --confirm N`` on a finished search: retrain its best config and its baseline with
    N fresh seeds and add the confirmation to its parent run and report."""
    client = MlflowClient(uri)
    parent_id = record["parent_run_id"]
    rows = list(read_rows(folder / TABLE_FILE).values())
    metrics, modes = objective_of(plan.study["objective"])
    by_id = {r["trial_id"]: r for r in rows}
    best = by_id.get(client.get_run(parent_id).data.tags.get(names.BEST_TRIAL_ID)) or best_row(rows, metrics[0], modes[0])
    if best is None:
        raise ConfigError(f"--confirm: {folder.name} has no completed trial to confirm")
    summary: dict = {}
    lines = confirm(plan, search_setup(plan, folder, record, uri), {p: best[p] for p in plan.study["space"]},
                    baseline_row(rows), args.confirm, summary)
    mt.log(client, parent_id, metrics=summary, tags={names.CONFIRMED_TRIAL: best["trial_id"]})
    log_search_report(client, parent_id, folder)
    print(f"{folder.name}: best trial {best['trial_id']}\n" + "\n".join(lines), flush=True)
    return 0


def run_on_ray(plan, args, uri: str, resumed: tuple[Path, dict, str] | None, lock: SearchLock) -> int:
    os.environ.update(QUIET_ENV)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    client = MlflowClient(uri)
    folder, record, mode = resumed or new_search(plan, client, uri, lock)
    keep_optuna_study(plan, client, folder, record)  # a new search, or one from before the study was kept
    parent_id = record["parent_run_id"]
    budget = plan.study["budget"]["trials"]
    metrics, modes = objective_of(plan.study["objective"])
    setup = search_setup(plan, folder, record, uri)
    print(plan.describe(), flush=True)
    print(f"search folder: {folder}\nMLflow: {ui_address(uri)} (experiment '{plan.study_name}', parent run "
          f"{parent_id})\nOptuna: {optuna_address(record)}", flush=True)
    if mode != "new":
        client.update_run(parent_id, status="RUNNING")
    cost.keep_in_record(record, plan.study, plan.trial_estimate_s())  # --resume may raise the budget
    client.set_tag(parent_id, names.BUDGET, cost.budget_tag(plan.study))
    save_record(folder, {**record, "state": RUNNING})
    started = time.time()
    grids, rows, registered = [], [], False
    with StopSignals() as stop:
        try:
            _, phase1_s = train_up_front(plan, setup, client, on_resources)  # the trials then only read the cache
            cost.add_phase1(record, phase1_s)
            save_record(folder, {**record, "state": RUNNING})
            if mode == "new" or record.get("state") != FINISHED:  # the last Tune run, new or unfinished
                grids.append(stop.fit(make_tuner(plan, folder, record["runs"][-1], setup, client,
                                                 restore=mode != "new", record=record,
                                                 budget=record["study_config"]["budget"]["trials"])))
            if mode == "extend" and not stop.received:
                done = list(read_rows(folder / TABLE_FILE))
                extra = budget - len(done)  # a search its cost budget ended has trials left of its own
                record["runs"].append({"dir": f"extend-{len(record['runs'])}", "trials": extra, "rows_before": done})
                record["study_config"] = plan.study
                client.log_param(parent_id, f"trials_after_extension_{len(record['runs']) - 1}", budget)
                save_record(folder, record)
                print(f"extending {folder.name} by {extra} trials to {budget}", flush=True)
                grids.append(stop.fit(make_tuner(plan, folder, record["runs"][-1], setup, client,
                                                 restore=False, budget=budget, record=record)))
            rows = collect_rows(plan, client, folder, grids, interrupted=bool(stop.received))
            if stop.received:
                return stop_interrupted(plan, args, client, folder, record, rows, stop.received)
            registered = wrap_up(plan, args, setup, client, folder, record, rows, metrics, modes,
                                 time.time() - started)
            save_record(folder, {**record, "state": FINISHED})
        except KeyboardInterrupt:
            return stop_interrupted(plan, args, client, folder, record,
                                    rows or collect_rows(plan, client, folder, grids, interrupted=True),
                                    stop.received or "SIGINT")
        except Exception as exc:
            mt.fail_run(client, parent_id, exc)
            save_record(folder, {**record, "state": INTERRUPTED_STATE})
            print(f"error: the search failed: {error_line(exc)}", file=sys.stderr)
            return 1
    return 0 if registered and any(r["status"] == COMPLETED for r in rows) else 1


def ui_address(uri: str) -> str:
    """What a user opens to see the runs: ``LPT_MLFLOW_UI`` (the compose stack sets the host's
    tunnel address; the tracking URI there is a name only containers resolve), the ``mlflow ui``
    command for a local store, else the tracking URI."""
    shown = os.environ.get("LPT_MLFLOW_UI", "").strip()
    if shown:
        return shown
    if mt.sqlite_path(uri) is not None:
        return f"mlflow ui --backend-store-uri {uri}"
    return uri


def optuna_address(record: dict) -> str:
    """How to watch or reload the search's Optuna study: ``LPT_OPTUNA_UI`` (the compose stack's
    read-only optuna-dashboard), else the optuna-dashboard command for its storage."""
    shown = os.environ.get("LPT_OPTUNA_UI", "").strip() or f"optuna-dashboard {shlex.quote(record['optuna_storage'])}"
    return f"{shown}  (study '{record['optuna_study']}'; or optuna.load_study(study_name=..., storage=...))"


def wrap_up(plan, args, setup: SearchSetup, client: MlflowClient, folder: Path, record: dict,
            rows: list[dict], metrics: list[str], modes: list[str], seconds: float) -> bool:
    """Test accuracy of the best trial, confirmation, report, registration (``--register``) and
    the summary; False when the model was asked for and not registered."""
    parent_id = setup.parent_run_id
    counts = status_counts(rows)
    summary = {"trials_" + k: v for k, v in counts.items()}
    summary["search_wall_s"] = seconds
    best, baseline = best_row(rows, metrics[0], modes[0]), baseline_row(rows)
    val_images = len(plan.data.val)
    summary[SIZE_METRIC] = val_images
    registered = True
    spend = cost.outcome(record, rows)
    record["budget_ended"] = spend["ended"]
    summary.update(gpu_hours=spend["gpu_hours"], cpu_hours=spend["cpu_hours"],
                   trials_not_started=spend["trials"] - spend["allowed"])
    if spend["limit"] is not None:
        client.set_tag(parent_id, names.BUDGET_ENDED, str(spend["ended"]).lower())
    write_table(rows, folder / TABLE_FILE, metadata={names.BUDGET: json.dumps(spend)})
    lines = [f"\n{len(rows)} trials: {counts['completed']} completed, {counts['early_stopped']} stopped early "
             f"by ASHA, {counts['failed']} failed"
             + (f", {counts[BUDGET_STOPPED]} stopped by the budget" if counts[BUDGET_STOPPED] else "")
             + f" ({seconds:.0f} s)", *cost.summary_lines(spend)]
    lines += [f"  failed {r['trial_id']}: {r['error']}" for r in rows if r["status"] == FAILED][:5]
    lines.append(validation.describe(plan.summary))
    if best is not None:
        config = {p: best[p] for p in plan.study["space"]}
        prompt_file = prompt_path(folder, best["trial_id"])
        test = ray.get(on_resources(evaluate_prompts, plan.profile).remote(setup, config, str(prompt_file)))
        mt.log(client, best["mlflow_run_id"], metrics=test, tags={names.BEST: "true"})
        summary.update({f"best_{k}": v for k, v in {**{m: best[m] for m in metrics}, **test}.items()})
        summary[SE_METRIC] = binomial_se(best["val_acc"], val_images)
        client.set_tag(parent_id, names.BEST_TRIAL_ID, best["trial_id"])
        lines += [f"best trial {best['trial_id']}: " + ", ".join(f"{k}={v}" for k, v in config.items()),
                  "  validation: " + with_se(best, val_images),
                  "  test:       " + shot_line(test, "test_"),
                  f"  prompts:    {prompt_file}"]
        if args.register is not None:  # the pyfunc model of the best trial, in the Model Registry
            name = args.register or model_name(plan.study_name, plan.profile_name)
            try:
                lines.append("  model:      " + register_best(
                    setup.tracking_uri, name, study=plan.study_name, profile_name=plan.profile_name,
                    profile=plan.profile, data=plan.data, best=best, config=config, prompt_file=prompt_file,
                    test=test, parent_run_id=parent_id))
            except RegisterError as exc:
                print(f"error: {exc}", file=sys.stderr)
                lines.append(f"  model:      not registered ({exc})")
                registered = False
        if len(metrics) > 1:
            front = pareto(record)
            client.set_tag(parent_id, names.PARETO_TRIALS, ",".join(front))
            lines.append(f"  Pareto front on {', '.join(metrics)}: {', '.join(front)}")
        gain, gain_lines = validation_gain(best, baseline, list(plan.study["space"]), val_images, len(rows),
                                           None if args.confirm else f"{resume_command(args)} --confirm 3")
        summary.update(gain)
        lines += gain_lines
        if args.confirm:
            lines += confirm(plan, setup, config, baseline, args.confirm, summary)
            client.set_tag(parent_id, names.CONFIRMED_TRIAL, best["trial_id"])
        else:
            lines += stale_confirmation(client.get_run(parent_id).data.tags, best["trial_id"], args)
    elif counts[BUDGET_STOPPED]:
        lines.append(f"no trial completed: the budget stopped {counts[BUDGET_STOPPED]} before their last epoch")
    else:
        lines.append("no trial completed: see the table's error column and the trials' MLflow runs")
    mt.log(client, parent_id, metrics=summary)
    client.log_artifact(parent_id, str(folder / TABLE_FILE))
    log_search_report(client, parent_id, folder)  # figures and summary.html
    client.set_terminated(parent_id, "FINISHED")
    lines += [f"table:  {folder / TABLE_FILE}",
              f"MLflow: {ui_address(setup.tracking_uri)}  (experiment '{plan.study_name}')",
              f"Optuna: {optuna_address(record)}"]
    print("\n".join(lines), flush=True)
    return registered


def shot_line(values: dict, prefix: str) -> str:
    """``80.00% (many 90.00 / medium 75.00 / few 50.00)``."""
    return shots(values, prefix, "{:.2f}", "%")


def stale_confirmation(tags: dict, best_trial_id: str, args) -> list[str]:
    """A line when the parent's ``confirm_*`` metrics are of an earlier best trial (the search was
    extended without ``--confirm``): they stay on the run, ``lpt.confirmed_trial`` says whose they are."""
    confirmed = tags.get(names.CONFIRMED_TRIAL)
    if confirmed is None or confirmed == best_trial_id:
        return []
    return [f"  confirmation: the parent run's confirm_* metrics are of trial {confirmed}, the best before this "
            f"extension; confirm {best_trial_id} with {resume_command(args)} --confirm N"]


def confirm(plan, setup: SearchSetup, config: dict, baseline: dict | None, n: int, summary: dict) -> list[str]:
    """Retrain the best config, and the baseline's when it ran every epoch and is another config,
    with the same ``n`` fresh seeds (all at once, as Ray tasks); adds the means and stds to
    ``summary`` and returns the summary lines."""
    seeds = [plan.profile["seed"] + 1000 + i for i in range(n)]
    configs = {"best": config}
    base = ({p: baseline[p] for p in plan.study["space"]}
            if baseline is not None and baseline["status"] == COMPLETED else None)
    if base is not None and base != config:
        configs["baseline"] = base
    print(f"confirming the best config{' and the baseline' if len(configs) > 1 else ''} with seeds {seeds} ...",
          flush=True)
    task = on_resources(confirm_seed, plan.profile)
    pending = {name: [task.remote(setup, c, s) for s in seeds] for name, c in configs.items()}
    results = {name: ray.get(refs) for name, refs in pending.items()}
    if base is not None and "baseline" not in results:  # the best trial is the baseline
        results["baseline"] = results["best"]
    metrics, lines = confirm_summary(results)
    summary.update(metrics)
    return lines
