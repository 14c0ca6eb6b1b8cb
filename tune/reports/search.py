"""The report of a search, as artifacts of its parent MLflow run (PNG, CSV, HTML).

``search_report`` (called by the driver's wrap-up and by ``tune/report.py``) works from the parent
MLflow run, the trial runs and ``trials.parquet`` alone: an in-memory Optuna study rebuilt from the
table (``build_study``) drawn with ``optuna.visualization.matplotlib`` (optimisation history,
learning curves, parameter importances, parallel coordinates, slices, Pareto front for several
objectives), ``trials.csv`` and ``summary.html`` (best config against the profile's defaults,
accuracy with many/medium/few, extra parameters, wall time, the figures inline).
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tune import names
from tune.config.loading import objective_of
from tune.config.space import ParamSpec, Space
from tune.config.study import SHOT_KEYS, Objective, ProfileConfig
from tune.names import REPORT_DIR, SEARCH_FILE
from tune.plotting import log_report_error
from tune.record import SearchRecord, load_record
from tune.reports.html import SearchReport, TrialCounts, summary_html
from tune.reports.study import build_study, search_figures
from tune.storage import Location, location

if TYPE_CHECKING:  # the table module imports Ray: imported where the table is read
    from tune.trial.table import TrialRow


# ============================================================================ per search: tables and summary
def write_csv(rows: list[TrialRow], path: Path) -> Path:
    """The trial table as CSV: one row per trial, the Parquet table's columns in its order."""
    flat = [row.columns() for row in rows]  # the CSV's edge: a row as its columns
    columns: list[str] = []
    for row in flat:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in flat:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return path


def profile_defaults(profile: ProfileConfig | None, params: list[str]) -> dict:
    """What a param is when the study does not search it: the profile's model value or phase-2
    recipe value, else ``PhaseConfig``'s default."""
    from lpt_core.trainer import PhaseConfig

    model = profile.model.model_dump() if profile else {}
    recipe = (profile.phase2 if profile else PhaseConfig()).model_dump()
    return {p: model[p] if p in model else recipe.get(p) for p in params}


def stored_record(folder: Location) -> SearchRecord | None:
    """The search's record; None without one, or when this version cannot read it (the report
    goes on with what the parent run holds)."""
    try:
        return load_record(folder) if (folder / SEARCH_FILE).is_file() else None
    except ValueError:
        return None


def stored_profile(record: SearchRecord | None, folder: Location) -> ProfileConfig | None:
    """The search's profile as search.json (or profile.yaml) holds it; None without one, or when
    it no longer validates (the report goes on without the profile's values)."""
    if record is not None:
        return record.profile
    if not (folder / names.PROFILE_FILE).is_file():
        return None
    import yaml

    try:
        return ProfileConfig.model_validate(yaml.safe_load((folder / names.PROFILE_FILE).read_text()))
    except ValueError:
        return None


def prompt_file_params(path: Location) -> int | None:
    """Extra parameters of a prompt file: the number of values in its tensors (read from the header)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with path.local_copy() as local, safe_open(str(local), "pt") as f:
        return int(sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()))


PARENT_METRICS = ("search_wall_s", "gpu_hours", "cpu_hours", "val_images", "val_acc_se", "baseline_val_acc_se")


def report_space(params: dict[str, str], record: SearchRecord | None) -> dict[str, ParamSpec]:
    """The searched space, ``{name: spec}`` in the study file's order: the parent run's ``space``
    param (JSON, validated into the space models here), else search.json's; empty without either."""
    if "space" in params:
        return Space.model_validate(json.loads(params["space"])).params()
    return record.study_config.space.params() if record else {}


def backbone_params(spec: dict) -> int | None:
    """Parameters of the profile's backbone, counted on the meta device (no weights, no download)."""
    from lpt_core import build_backbone_from_spec

    try:
        with torch.device("meta"):
            model = build_backbone_from_spec({**spec, "weights": "random"})
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:
        return None


def search_report(
    client, parent_run_id: str, out: str | Path | Location, folder: str | Path | Location | None = None
) -> dict:
    """Build the search report of ``parent_run_id`` in ``out`` (a local folder, or a folder of the
    search's storage, where each file is published whole) from MLflow and the search folder's
    ``trials.parquet`` (and its ``search.json`` / ``profile.yaml`` for the profile's defaults);
    log the files to the parent run under ``report/``. Returns what it built.

    Raises FileNotFoundError when the table is missing, KeyError for a run that is not a search."""
    out = location(out)
    if out.is_local:
        return _build_report(client, parent_run_id, out.local_path, folder)
    with tempfile.TemporaryDirectory(prefix="lpt-report-") as tmp:
        built = _build_report(client, parent_run_id, Path(tmp), folder)
        for path in built["files"]:
            (out / path.name).upload(path)
    return {**built, "out": out, "files": [out / p.name for p in built["files"]]}


def _build_report(client, parent_run_id: str, out: Path, folder: str | Path | Location | None) -> dict:
    from tune.names import TABLE_FILE
    from tune.trial.table import best_row, prompt_path, read_rows, status_counts

    parent = client.get_run(parent_run_id)
    tags, params, pm = parent.data.tags, parent.data.params, parent.data.metrics
    if tags.get(names.ROLE) != names.ROLE_STUDY:
        raise KeyError(f"run {parent_run_id} is not a search's parent run (lpt.role={tags.get(names.ROLE)})")
    folder = location(folder or tags.get(names.STORAGE, ""))
    table = folder / TABLE_FILE
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no trial table")
    rows = list(read_rows(table).values())
    record = stored_record(folder)
    space = report_space(params, record)
    objective = (  # as the parent run or search.json holds it
        Objective.model_validate(json.loads(params["objective"]))
        if "objective" in params
        else record.study_config.objective
        if record
        else Objective()
    )
    metrics, modes = objective_of(objective)
    profile = stored_profile(record, folder)

    runs = {
        r.data.tags.get(names.TRIAL_ID): r
        for r in client.search_runs(
            [parent.info.experiment_id], f"tags.`{names.PARENT}` = '{parent_run_id}'", max_results=5000
        )
    }
    order = [
        tid for tid, _ in sorted(((tid, r.info.start_time or 0) for tid, r in runs.items() if tid), key=lambda x: x[1])
    ]
    histories = {}
    if len(metrics) == 1:
        for row in rows:
            run = runs.get(row.trial_id)
            if run is not None:
                histories[row.trial_id] = {
                    m.step: m.value for m in client.get_metric_history(run.info.run_id, metrics[0])
                }

    out.mkdir(parents=True, exist_ok=True)
    study = build_study(rows, space, metrics, modes, histories, order)
    figures, skipped = search_figures(study, metrics, out)
    write_csv(rows, out / names.REPORT_TABLE)

    by_id = {r.trial_id: r for r in rows}
    best = by_id.get(tags.get(names.BEST_TRIAL_ID)) or best_row(rows, metrics[0], modes[0])
    test, extra = {}, None
    if best is not None:
        run = runs.get(best.trial_id)
        best_metrics = run.data.metrics if run is not None else {}
        test = {f"test_{k}": pm[f"best_test_{k}"] for k in SHOT_KEYS if f"best_test_{k}" in pm} or {
            k: v for k, v in best_metrics.items() if k.startswith("test_")
        }
        extra = (
            int(best_metrics["extra_params"])
            if "extra_params" in best_metrics
            else prompt_file_params(prompt_path(folder, best.trial_id))
        )
    sign = 1 if modes[0] == "max" else -1

    def rank(r: TrialRow) -> tuple:
        v = r.metric(metrics[0])
        ok = math.isfinite(v)
        return (r.status != "completed", not ok, -sign * v if ok else 0.0)

    ranked = sorted(rows, key=rank)
    counts = status_counts(rows)
    info = SearchReport(
        name=tags.get(names.SEARCH, parent.info.run_name),
        study=params.get("study", record.study if record else None),
        profile=params.get("profile", record.profile_name if record else None),
        metrics=metrics,
        modes=modes,
        counts=TrialCounts(**counts, total=len(rows)),
        experiment_id=parent.info.experiment_id,
        parent_run_id=parent_run_id,
        table=str(table),
        space=space,
        defaults=profile_defaults(profile, list(space)),
        best=best,
        test=test,
        confirm={k: v for k, v in pm.items() if k.startswith("confirm_")},
        confirmed_trial=tags.get(names.CONFIRMED_TRIAL),
        confirmation=tags.get(names.CONFIRMATION),
        test_exposed=[t for t in tags.get(names.TEST_EXPOSED, "").split(",") if t],
        extra_params=extra,
        backbone_params=backbone_params(profile.backbone.spec()) if extra and profile else None,
        pareto=[t for t in tags.get(names.PARETO_TRIALS, "").split(",") if t],
        top=ranked[:10],
        baseline=next((r for r in rows if r.baseline), None),
        gain={k: v for k, v in pm.items() if k.startswith("gain_val_")},
        **{k: pm.get(k) for k in PARENT_METRICS},  # the parent run's metrics the page shows as they are
    )
    (out / names.REPORT_PAGE).write_text(summary_html(info, figures, skipped))
    files = sorted(p for p in out.iterdir() if p.is_file())
    client.log_artifacts(parent_run_id, str(out), REPORT_DIR)
    return {"out": out, "files": files, "skipped": skipped, "best": best, "study": study}


def log_search_report(client, parent_run_id: str, folder: Location, log: Callable[[str], None] = print) -> None:
    """``search_report`` into ``folder/report`` for the driver's wrap-up; a failure is a warning
    and the tag ``lpt.report_error``, never a failed search."""
    try:
        started = time.perf_counter()
        built = search_report(client, parent_run_id, location(folder) / REPORT_DIR, folder)
        log(
            f"report: {built['out']} ({len(built['files'])} files, {time.perf_counter() - started:.0f} s; "
            f"rebuild with python tune/report.py)"
        )
    except Exception as exc:  # a report is a convenience; the search's results stand without it
        log_report_error(client, parent_run_id, exc, "warning: no search report", log)
