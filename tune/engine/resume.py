"""Resuming a search (``--resume``): find the latest search of a study and profile, refuse one that
differs, and say what is left to do (resume, extend, finished)."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from tune import names
from tune import tracking as mt
from tune.config import budget as cost
from tune.config.loading import objective_of
from tune.config.study import StudyConfig
from tune.engine import budget_ledger as ledger
from tune.engine.baseline_gain import baseline_row
from tune.engine.confirmation import confirm
from tune.engine.optuna_storage import storage_url
from tune.engine.tuner import search_setup
from tune.errors import ConfigError
from tune.names import TABLE_FILE
from tune.record import FINISHED, SearchRecord, latest_search, load_record, save_record
from tune.reports.search import log_search_report
from tune.storage import Location
from tune.trial.table import COMPLETED, best_row, read_rows, status_counts


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


def _comparable(study: StudyConfig) -> dict:
    """The study as search.json holds it, but for what a resumed search may change: its budget's
    trials and cost keys (``cost.resumed_budget``)."""
    free = dict.fromkeys(("trials", *cost.BUDGET_KEYS))
    return _plain({**study.to_dict(), "budget": {**study.budget.model_dump(exclude_none=True), **free}})


def resume_mode(plan, args, record: SearchRecord, folder: Location) -> str:
    """``resume`` (finish the budget), ``extend`` (more trials) or ``finished``; a search that
    differs from the one in ``folder`` is refused, since its trials would mix two searches."""
    if record.manifest_hash != plan.manifest_hash:
        raise ConfigError(
            f"--resume: {folder.name} was run on other data (manifest "
            f"{record.manifest_hash[:12]}, now {plan.manifest_hash[:12]}); start a new search"
        )
    stored_study, stored_profile = record.study_config, record.profile
    diff = first_difference(_plain(stored_profile.to_dict()), _plain(plan.profile.to_dict()))
    if diff:
        raise ConfigError(f"--resume: profile {diff} in {folder.name}; start a new search without --resume")
    cost.resumed_budget(plan.study, stored_study.budget, plan.budget_given)
    budget = stored_study.budget.trials
    asked = budget if args.trials is None else args.trials  # the search's own budget unless --trials
    diff = first_difference(_comparable(stored_study), _comparable(plan.study))
    if diff:
        raise ConfigError(f"--resume: study {diff} in {folder.name}; start a new search without --resume")
    if asked < budget:
        raise ConfigError(
            f"--trials {asked}: the search in {folder.name} has a budget of {budget}; resume it "
            f"as it is (no --trials), or extend it with --trials N (N > {budget})"
        )
    plan.study.budget.trials = asked
    mode = "extend" if asked > budget else "finished" if record.state == FINISHED else "resume"
    return ledger.resume_mode(mode, record, plan.study, folder)


def find_resumed(plan, args) -> tuple[Location, SearchRecord, str]:
    """For ``--resume``: the latest search of this study and profile, its record and what to do
    (``resume_mode``). Read before Ray starts, so that a refusal is one line and costs nothing."""
    prefix = f"{plan.study_name}-{plan.profile_name}"
    folder = latest_search(plan.storage, prefix)
    if folder is None:
        raise ConfigError(f"--resume: no search of {prefix} under {plan.storage} to resume")
    try:
        record = load_record(folder)
    except ValueError as exc:  # a record this version cannot read: one line, nothing changed
        raise ConfigError(f"--resume: {exc}; start a new search without --resume") from None
    return folder, record, resume_mode(plan, args, record, folder)


def keep_optuna_study(plan, client: MlflowClient, folder: Location, record: SearchRecord) -> None:
    """Name a new search's Optuna storage and study in its record and parent run (once)."""
    if "optuna_study" in record.model_fields_set:
        return
    record.optuna_storage, record.optuna_study = storage_url(folder), record.name
    client.set_tag(record.parent_run_id, names.OPTUNA_STORAGE, record.optuna_storage)
    client.set_tag(record.parent_run_id, names.OPTUNA_STUDY, record.optuna_study)
    save_record(folder, record)


def say_finished(plan, folder: Location, record: SearchRecord) -> int:
    budget = record.study_config.budget.trials
    counts = status_counts(list(read_rows(folder / TABLE_FILE).values()))
    ended = ledger.finished_line(record, plan.study, folder)
    print(
        f"{folder.name} is finished: {budget} trials ({counts[COMPLETED]} completed"
        + (f"; {ended}" if ended else "")
        + f"). See its summary with python tune/report.py --study "
        f"{plan.study_name}; extend it with --resume --trials N (N > {budget}), or confirm its best on test "
        f"with --resume --confirm 5 (it tests the best and the baseline again with fresh seeds)",
        flush=True,
    )
    return 0


def confirm_finished(plan, args, uri: str, folder: Location, record: SearchRecord) -> int:
    """``--resume --confirm N`` on a finished search: retrain its best config and its baseline with
    N fresh seeds and add the confirmation to its parent run and report."""
    client = MlflowClient(uri)
    parent_id = record.parent_run_id
    rows = list(read_rows(folder / TABLE_FILE).values())
    metrics, modes = objective_of(plan.study.objective)
    by_id = {r.trial_id: r for r in rows}
    best = by_id.get(client.get_run(parent_id).data.tags.get(names.BEST_TRIAL_ID, "")) or best_row(
        rows, metrics[0], modes[0]
    )
    if best is None:
        raise ConfigError(f"--confirm: {folder.name} has no completed trial to confirm")
    summary, tags, lines, seconds = confirm(
        plan,
        search_setup(plan, folder, record, uri),
        best.trial_id,
        {p: best.params[p] for p in plan.study.space.params()},
        baseline_row(rows),
        args.confirm,
    )
    lines += ledger.add_confirmation(record, seconds, rows, summary)  # the parent's gpu_hours/cpu_hours too
    save_record(folder, record)
    mt.log(client, parent_id, metrics=summary, tags={**tags, names.CONFIRMED_TRIAL: best.trial_id})
    log_search_report(client, parent_id, folder)
    print(f"{folder.name}: best trial {best.trial_id}\n" + "\n".join(lines), flush=True)
    return 0
