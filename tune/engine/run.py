"""The search itself, once the plan is checked: Ray, MLflow parent run, Tuner, and the wrap-up
(test accuracy of the best trial, optional confirmation seeds, the summary)."""

from __future__ import annotations

import os
import sys
import time

import optuna
import ray
from mlflow import MlflowClient

from tune import names, tracking_guard
from tune import tracking as mt
from tune.config import budget as cost
from tune.config.disk_space import check_free_space
from tune.config.loading import objective_of
from tune.engine import budget_ledger as ledger
from tune.engine.cluster_checks import check_cluster_nodes
from tune.engine.optuna_storage import fetch_copy, publish_copy
from tune.engine.phase1_upfront import train_up_front
from tune.engine.resume import confirm_finished, find_resumed, keep_optuna_study, say_finished
from tune.engine.search_lock import SearchLock
from tune.engine.stop_signals import StopSignals
from tune.engine.tuner import QUIET_ENV, check_resources, make_tuner, new_search, on_resources, search_setup, start_ray
from tune.engine.wrap_up import collect_rows, optuna_address, stop_interrupted, ui_address, wrap_up
from tune.errors import error_line
from tune.names import TABLE_FILE
from tune.record import FINISHED, INTERRUPTED_STATE, RUNNING, RunPart, SearchRecord, save_record
from tune.storage import Location
from tune.trial.table import COMPLETED, read_rows


def run_search(plan, args, uri: str, address: str | None) -> int:
    plan.storage.check_reachable()  # an object store that cannot be reached: one line, before anything
    check_free_space(plan.storage)  # the storage, Ray's temp folder, the work dir: their minimums
    resumed = find_resumed(plan, args) if args.resume else None
    if resumed and resumed[2] == "finished" and not args.confirm:
        return say_finished(plan, *resumed[:2])
    with SearchLock() as lock:
        if resumed:
            lock.take(resumed[0])  # a search another driver runs is refused here, before Ray starts
        start_ray(address)
        try:
            check_resources(plan.profile.resources, local=address is None)
            if address:
                check_cluster_nodes(plan.storage, plan.profile, plan.data, plan.manifest_hash)
            if resumed and resumed[2] == "finished":
                return confirm_finished(plan, args, uri, *resumed[:2])
            return run_on_ray(plan, args, uri, resumed, lock)
        finally:
            ray.shutdown()


def run_on_ray(plan, args, uri: str, resumed: tuple[Location, SearchRecord, str] | None, lock: SearchLock) -> int:
    os.environ.update(QUIET_ENV)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line
    client = MlflowClient(uri)
    folder, record, mode = resumed or new_search(plan, client, uri, lock)
    fetch_copy(folder, record)  # a search on object storage resumed on another machine: its SQLite study
    keep_optuna_study(plan, client, folder, record)
    parent_id = record.parent_run_id
    budget = plan.study.budget.trials
    metrics, modes = objective_of(plan.study.objective)
    setup = search_setup(plan, folder, record, uri)
    print(plan.describe(), flush=True)
    print(
        f"search folder: {folder}\nMLflow: {ui_address(uri)} (experiment '{plan.study_name}', parent run "
        f"{parent_id})\nOptuna: {optuna_address(record)}",
        flush=True,
    )
    if mode != "new":
        client.update_run(parent_id, status="RUNNING")
    ledger.keep_in_record(record, plan.study, plan.trial_estimate_s())  # --resume may raise the budget
    client.set_tag(parent_id, names.BUDGET, cost.budget_tag(plan.study))
    save_record(folder, record.model_copy(update={"state": RUNNING}))  # its own state read below
    started = time.time()
    grids, rows, registered = [], [], False
    with StopSignals() as stop:
        try:
            _, phase1_s = train_up_front(plan, setup, client, on_resources)  # the trials then only read the cache
            ledger.add_phase1(record, phase1_s)
            save_record(folder, record.model_copy(update={"state": RUNNING}))
            if mode == "new" or record.state != FINISHED:  # the last Tune run, new or unfinished
                grids.append(
                    stop.fit(
                        make_tuner(
                            plan,
                            folder,
                            record.runs[-1],
                            setup,
                            client,
                            restore=mode != "new",
                            record=record,
                            budget=record.study_config.budget.trials,
                        )
                    )
                )
            if mode == "extend" and not stop.received:
                done = list(read_rows(folder / TABLE_FILE))
                extra = budget - len(done)  # a search its cost budget ended has trials left of its own
                record.runs.append(RunPart(dir=f"extend-{len(record.runs)}", trials=extra, rows_before=done))
                record.use_study(plan.study)
                tracking_guard.for_search(folder, uri).attempt(
                    "log the extension",
                    client.log_param,
                    parent_id,
                    f"trials_after_extension_{len(record.runs) - 1}",
                    budget,
                )
                save_record(folder, record)
                print(f"extending {folder.name} by {extra} trials to {budget}", flush=True)
                grids.append(
                    stop.fit(
                        make_tuner(
                            plan, folder, record.runs[-1], setup, client, restore=False, budget=budget, record=record
                        )
                    )
                )
            rows = collect_rows(plan, client, folder, grids, interrupted=bool(stop.received))
            if stop.received:
                return stop_interrupted(plan, args, client, folder, record, rows, stop.received)
            registered = wrap_up(plan, args, setup, client, folder, record, rows, metrics, modes, time.time() - started)
            save_record(folder, record.model_copy(update={"state": FINISHED}))
        except KeyboardInterrupt:
            return stop_interrupted(
                plan,
                args,
                client,
                folder,
                record,
                rows or collect_rows(plan, client, folder, grids, interrupted=True),
                stop.received or "SIGINT",
            )
        except Exception as exc:
            tracking_guard.for_search(folder, uri).attempt("end the parent run", mt.fail_run, client, parent_id, exc)
            save_record(folder, record.model_copy(update={"state": INTERRUPTED_STATE}))
            print(f"error: the search failed: {error_line(exc)}", file=sys.stderr)
            return 1
        finally:
            publish_copy(folder, record.optuna_storage)
    return 0 if registered and any(r.status == COMPLETED for r in rows) else 1
