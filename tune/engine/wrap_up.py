"""After the Tuner: the trial table, test accuracy of the best trial, optional confirmation seeds, the
summary, the registered model. Every MLflow call here goes through the search's
``tune.tracking_guard``: MLflow out of reach records what lost its tracking and the search still
ends (the summary and the parent run's ``lpt.tracking_failures`` say what)."""

from __future__ import annotations

import os
import shlex
import sys

import ray
from mlflow import MlflowClient

from tune import names, tracking_guard
from tune import tracking as mt
from tune._cli import EXIT_INTERRUPTED
from tune.config import validation
from tune.config.validation import SE_METRIC, SIZE_METRIC, binomial_se
from tune.engine import budget_ledger as ledger
from tune.engine import test_exposure as exposure
from tune.engine.baseline_gain import baseline_row, validation_gain
from tune.engine.confirmation import DEFAULT_SEEDS, confirm
from tune.engine.tuner import on_resources, pareto
from tune.names import TABLE_FILE
from tune.record import INTERRUPTED_STATE, SearchRecord, save_record
from tune.reports.lines import shot_line, with_se
from tune.reports.search import log_search_report
from tune.serving.registry import RegisterError, model_name, register_best
from tune.storage import Location
from tune.trial import input_wait
from tune.trial.setup import SearchSetup
from tune.trial.table import (
    BUDGET_STOPPED,
    FAILED,
    INTERRUPTED,
    TrialRow,
    best_row,
    last_line,
    prompt_path,
    read_rows,
    status_counts,
    trial_row,
    write_table,
)
from tune.trial.trainable import evaluate_prompts
from tune.trial.trial_runs import close_lost_runs, close_trial_run, find_trial_run


def collect_rows(plan, client: MlflowClient, folder: Location, grids: list, interrupted: bool) -> list[TrialRow]:
    """The table's rows, plus a row for each trial that ended without one: the search was killed
    right after it, or (``interrupted``) it was still running when the search stopped."""
    by_id = read_rows(folder / TABLE_FILE)
    epochs = plan.phase2.epochs
    for grid in grids:
        for result in grid:
            tid = (result.metrics or {}).get("trial_id")
            if tid and tid not in by_id:
                error = last_line(result.error) if result.error and not interrupted else None
                by_id[tid] = row = trial_row(
                    tid,
                    result.config or {},
                    list(plan.study.space.params()),
                    result.metrics,
                    epochs,
                    error,
                    interrupted=interrupted,
                    resources=plan.profile.resources,
                )
                if row.status != INTERRUPTED:  # it ended, but its end reached no callback
                    guard = tracking_guard.for_search(folder, client.tracking_uri)
                    guard.attempt("close its run", close_trial_run, client, row, trial=tid)
    rows = list(by_id.values())
    write_table(rows, folder / TABLE_FILE)
    return rows


def stop_interrupted(
    plan, args, client: MlflowClient, folder: Location, record: SearchRecord, rows: list[TrialRow], signal_name: str
) -> int:
    """A stopped search: its unfinished trials' runs and the parent run end KILLED, the record
    says ``interrupted``, and one line says how to continue."""
    guard = tracking_guard.for_search(folder, client.tracking_uri)
    for row in (r for r in rows if r.status == INTERRUPTED):
        guard.attempt("end its run as interrupted", _kill_trial_run, client, record, row, trial=row.trial_id)
    write_table(rows, folder / TABLE_FILE)
    tags = {names.INTERRUPTED_BY: signal_name, **_failures_tag(guard)}
    parent = record.parent_run_id
    guard.attempt("end the parent run", mt.log, client, parent, metrics=ledger.search_spent(record, rows), tags=tags)
    guard.attempt("end the parent run", client.set_terminated, parent, "KILLED")
    save_record(folder, record.model_copy(update={"state": INTERRUPTED_STATE}))
    counts = status_counts(rows)
    ended = sum(counts.values()) - counts[INTERRUPTED]
    print(
        f"interrupted ({signal_name}): {ended} of {record.study_config.budget.trials} trials ended, "
        f"{counts[INTERRUPTED]} stopped mid-way keep their last epoch; continue with: "
        f"{resume_command(args)}",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_INTERRUPTED


def _kill_trial_run(client: MlflowClient, record: SearchRecord, row: TrialRow) -> None:
    run_id = find_trial_run(client, row, (record.experiment_id, record.parent_run_id))
    if run_id:
        client.set_tag(run_id, names.STATUS, INTERRUPTED)
        client.set_terminated(run_id, "KILLED")


def _failures_tag(guard: tracking_guard.TrackingGuard) -> dict[str, str]:
    return {names.TRACKING_FAILURES: guard.tag_value()} if guard.failures else {}


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


def optuna_address(record: SearchRecord) -> str:
    """How to watch or reload the search's Optuna study: ``LPT_OPTUNA_UI`` (the compose stack's
    read-only optuna-dashboard), else the optuna-dashboard command for its storage."""
    shown = os.environ.get("LPT_OPTUNA_UI", "").strip() or f"optuna-dashboard {shlex.quote(record.optuna_storage)}"
    return f"{shown}  (study '{record.optuna_study}'; or optuna.load_study(study_name=..., storage=...))"


def wrap_up(
    plan,
    args,
    setup: SearchSetup,
    client: MlflowClient,
    folder: Location,
    record: SearchRecord,
    rows: list[TrialRow],
    metrics: list[str],
    modes: list[str],
    seconds: float,
) -> bool:
    """Test accuracy of the best trial, confirmation, report, registration (``--register``) and
    the summary; False when the model was asked for and not registered."""
    parent_id = setup.parent_run_id
    guard = tracking_guard.for_search(folder, setup.tracking_uri)
    counts = status_counts(rows)
    summary: dict[str, float] = {"trials_" + k: v for k, v in counts.items()}
    summary["search_wall_s"] = seconds
    best, baseline = best_row(rows, metrics[0], modes[0]), baseline_row(rows)
    val_images = len(plan.data.val)
    summary[SIZE_METRIC] = val_images
    registered = True
    spend = ledger.outcome(record, rows)
    record.budget_ended = spend.ended
    summary.update(
        gpu_hours=spend.gpu_hours, cpu_hours=spend.cpu_hours, trials_not_started=spend.trials - spend.allowed
    )
    if spend.limit is not None:
        guard.attempt("tag the budget", client.set_tag, parent_id, names.BUDGET_ENDED, str(spend.ended).lower())
    closed = close_lost_runs(client, rows, guard, (setup.experiment_id, parent_id))  # MLflow is back
    write_table(rows, folder / TABLE_FILE, metadata={names.BUDGET: spend.to_json()})
    lines = [
        f"\n{len(rows)} trials: {counts['completed']} completed, {counts['early_stopped']} stopped early "
        f"by ASHA, {counts['failed']} failed"
        + (f", {counts[BUDGET_STOPPED]} stopped by the budget" if counts[BUDGET_STOPPED] else "")
        + f" ({seconds:.0f} s)",
        *ledger.summary_lines(spend),
    ]
    lines += [f"  failed {r.trial_id}: {r.error}" for r in rows if r.status == FAILED][:5]
    lines.append(validation.describe(plan.summary))
    lines += input_wait.summary_lines(rows, plan.profile)
    if best is not None:
        config = {p: best.params[p] for p in plan.study.space.params()}
        tid = best.trial_id
        prompt_file = prompt_path(folder, tid)
        parent = guard.attempt("read the test ledger", client.get_run, parent_id)
        before = exposure.exposed(parent.data.tags if parent else {})
        test = ray.get(on_resources(evaluate_prompts, plan.profile).remote(setup, config, prompt_file))
        tested = guard.attempt("record the test exposure", exposure.expose, client, parent_id, [tid]) or [tid]
        guard.attempt(
            "log its test scores",
            mt.log,
            client,
            best.mlflow_run_id,
            metrics=test,
            tags={names.BEST: "true"},
            trial=tid,
        )
        summary.update({f"best_{k}": v for k, v in {**{m: best.metric(m) for m in metrics}, **test}.items()})
        summary[SE_METRIC] = binomial_se(best.val_acc, val_images)
        guard.attempt("tag the best trial", client.set_tag, parent_id, names.BEST_TRIAL_ID, tid)
        lines += [
            f"best trial {tid}: " + ", ".join(f"{k}={v}" for k, v in config.items()),
            "  validation: " + with_se(best.metrics(), val_images),
            *filter(None, [exposure.new_best_line(before, tid)]),
            "  test:       " + shot_line(test, "test_") + f"; {exposure.seen(tested)}",
            f"  prompts:    {prompt_file}",
        ]
        if args.register is not None:  # the pyfunc model of the best trial, in the Model Registry
            name = args.register or model_name(plan.study_name, plan.profile_name)
            try:
                lines.append(
                    "  model:      "
                    + register_best(
                        setup.tracking_uri,
                        name,
                        study=plan.study_name,
                        profile_name=plan.profile_name,
                        profile=plan.profile,
                        data=plan.data,
                        best=best,
                        config=config,
                        prompt_file=prompt_file,
                        test=test,
                        parent_run_id=parent_id,
                    )
                )
            except RegisterError as exc:
                print(f"error: {exc}", file=sys.stderr)
                lines.append(f"  model:      not registered ({exc})")
                registered = False
        if len(metrics) > 1:
            front = pareto(record.optuna_storage, record.optuna_study)
            guard.attempt("tag the Pareto front", client.set_tag, parent_id, names.PARETO_TRIALS, ",".join(front))
            lines.append(f"  Pareto front on {', '.join(metrics)}: {', '.join(front)}")
        gain, gain_lines = validation_gain(
            best,
            baseline,
            list(plan.study.space.params()),
            val_images,
            len(rows),
            None if args.confirm else f"{resume_command(args)} --confirm {DEFAULT_SEEDS}",
        )
        summary.update(gain)
        lines += gain_lines
        if args.confirm:
            confirmed, tags, confirm_lines, seconds = confirm(plan, setup, tid, config, baseline, args.confirm)
            summary.update(confirmed)
            confirm_lines += ledger.add_confirmation(record, seconds, rows, summary)  # counted in the budget
            guard.attempt("tag the confirmation", mt.log, client, parent_id, tags={**tags, names.CONFIRMED_TRIAL: tid})
            lines += confirm_lines
        else:
            parent = guard.attempt("read the confirmation tags", client.get_run, parent_id)
            lines += stale_confirmation(parent.data.tags, tid, args) if parent else []
    elif counts[BUDGET_STOPPED]:
        lines.append(f"no trial completed: the budget stopped {counts[BUDGET_STOPPED]} before their last epoch")
    else:
        lines.append("no trial completed: see the table's error column and the trials' MLflow runs")
    guard.attempt("log the summary metrics", mt.log, client, parent_id, metrics=summary)
    guard.attempt("log the trial table", mt.log_stored_file, client, parent_id, folder / TABLE_FILE)
    guard.attempt("log the search report", log_search_report, client, parent_id, folder)  # figures, summary.html
    guard.attempt("end the parent run", client.set_terminated, parent_id, "FINISHED")
    if guard.failures:  # what lost its tracking, on the parent run once MLflow is back
        guard.attempt("tag the tracking failures", client.set_tag, parent_id, *_failures_tag(guard).popitem())
    lines += guard.summary_lines(closed)
    lines += [
        f"table:  {folder / TABLE_FILE}",
        f"MLflow: {ui_address(setup.tracking_uri)}  (experiment '{plan.study_name}')",
        f"Optuna: {optuna_address(record)}",
    ]
    print("\n".join(lines), flush=True)
    return registered


def stale_confirmation(tags: dict, best_trial_id: str, args) -> list[str]:
    """A line when the parent's ``confirm_*`` metrics are of an earlier best trial (the search was
    extended without ``--confirm``): they stay on the run, ``lpt.confirmed_trial`` says whose they are."""
    confirmed = tags.get(names.CONFIRMED_TRIAL)
    if confirmed is None or confirmed == best_trial_id:
        return []
    return [
        f"  confirmation: the parent run's confirm_* metrics are of trial {confirmed}, the best before this "
        f"extension; {exposure.seen(exposure.exposed(tags))}, and confirming {best_trial_id} "
        f"({resume_command(args)} --confirm {DEFAULT_SEEDS}) tests it and the baseline again: judge it by "
        f"its interval, not against the other configs' test numbers"
    ]


def resume_command(args) -> str:
    """The command line that continues this search: its own study, profile, overrides and storage."""
    q = shlex.quote
    parts = [
        "python tune/search.py",
        f"--study {q(args.study)}",
        f"--profile {q(args.profile)}",
        *(f"--set {q(s)}" for s in args.set),
        *([f"--storage {q(args.storage)}"] if args.storage else []),
        "--resume",
    ]
    return " ".join(parts)
