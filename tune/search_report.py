"""The report of a search, as artifacts of its parent MLflow run (PNG, CSV, HTML).

``search_report`` (called by the driver's wrap-up and by ``tune/report.py``) works from the parent
MLflow run, the trial runs and ``trials.parquet`` alone: an in-memory Optuna study rebuilt from the
table (``build_study``) drawn with ``optuna.visualization.matplotlib`` (optimisation history,
learning curves, parameter importances, parallel coordinates, slices, Pareto front for several
objectives), ``trials.csv`` and ``summary.html`` (best config against the profile's defaults,
accuracy with many/medium/few, extra parameters, wall time, the figures inline).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import names
from .names import REPORT_DIR, SEARCH_FILE
from .study_config import SHOT_KEYS, error_line, objective_of
from .figures import log_report_error, pyplot, save_figure


# ============================================================================ per search: Optuna study
def distributions(space: dict, rows: list[dict]) -> dict:
    """One Optuna distribution per searched param, wide enough for every value in the table
    (the trainable narrows ``top_k`` and ``group_start`` per trial; the table holds what ran)."""
    import optuna.distributions as od
    out = {}
    for name, spec in space.items():
        seen = [r[name] for r in rows if r.get(name) is not None]
        if spec["type"] == "choice":
            values = list(spec["values"]) + [v for v in seen if v not in spec["values"]]
            out[name] = od.CategoricalDistribution(values)
            continue
        integer = spec["type"] == "int"
        cast = int if integer else float
        seen = [cast(v) for v in seen if not (isinstance(v, float) and math.isnan(v))]
        low, high = cast(min([spec["low"], *seen])), cast(max([spec["high"], *seen]))
        log = bool(spec.get("log", False))
        step = spec.get("step")
        if step is not None and not log and all(_on_grid(v, low, step) for v in seen):
            high = low + math.floor((high - low) / step + 1e-9) * step
            high = max(high, *seen) if seen else high
        else:
            step = None
        if integer:
            out[name] = od.IntDistribution(low, high, log=log, step=int(step or 1))
        else:
            out[name] = od.FloatDistribution(low, high, log=log, step=step)
    return out


def _on_grid(value: float, low: float, step: float) -> bool:
    k = (value - low) / step
    return abs(k - round(k)) < 1e-8  # as strict as Optuna's own check


def build_study(rows: list[dict], space: dict, metrics: list[str], modes: list[str],
                histories: dict[str, dict[int, float]] | None = None, order: list[str] | None = None):
    """An in-memory Optuna study of the search: completed trials are COMPLETE with their final
    objective values, trials that ASHA stopped are PRUNED (with their per-epoch values as
    intermediate values when ``histories`` has them), failed ones FAIL."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = ["maximize" if m == "max" else "minimize" for m in modes]
    study = optuna.create_study(directions=directions, study_name="search")
    dists = distributions(space, rows)
    histories = histories or {}
    rank = {tid: i for i, tid in enumerate(order or [])}
    for row in sorted(rows, key=lambda r: (rank.get(r["trial_id"], len(rank)), r["trial_id"])):
        params, used = {}, {}
        for name, dist in dists.items():
            value = row.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            value = int(value) if isinstance(dist, optuna.distributions.IntDistribution) else value
            params[name], used[name] = value, dist
        values = [row.get(m) for m in metrics]
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        state = {"completed": "COMPLETE", "early_stopped": "PRUNED", "budget_stopped": "PRUNED"}.get(row["status"],
                                                                                                  "FAIL")
        if state == "COMPLETE" and not finite:
            state = "FAIL"
        inter = {}
        if len(metrics) == 1 and state != "FAIL":
            inter = {int(k): float(v) for k, v in histories.get(row["trial_id"], {}).items() if math.isfinite(v)}
            if not inter and finite and row.get("epochs"):
                inter = {int(row["epochs"]): float(values[0])}
        trial = optuna.trial.create_trial(
            state=getattr(optuna.trial.TrialState, state),
            values=[float(v) for v in values] if state == "COMPLETE" else None,
            params=params, distributions=used, intermediate_values=inter or None,
            user_attrs={names.OPTUNA_TRIAL_ID: row["trial_id"], "status": row["status"],
                        "mlflow_run_id": row.get("mlflow_run_id") or ""})
        study.add_trial(trial)
    return study


def search_figures(study, metrics: list[str], out: Path,
                   names: Sequence[str] | None = None) -> tuple[list[Path], dict[str, str]]:
    """Optuna's matplotlib figures of ``study`` (all, or ``names``) as PNGs in ``out``;
    returns (files, {name: why it was not drawn})."""
    plt = pyplot()  # Agg before Optuna's module imports pyplot
    import optuna
    import optuna.visualization.matplotlib as ovm
    out.mkdir(parents=True, exist_ok=True)
    multi = len(metrics) > 1
    first = (lambda t: t.values[0]) if multi else None
    target = dict(target=first, target_name=metrics[0]) if multi else dict(target_name=metrics[0])
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    params = sorted({p for t in study.trials for p in t.params})
    varied = [p for p in params if len({repr(t.params.get(p)) for t in done if p in t.params}) > 1]
    plots = {
        "optimization_history": (1, lambda: ovm.plot_optimization_history(study, **target)),
        "intermediate_values": (0, None if multi else lambda: ovm.plot_intermediate_values(study)),
        "param_importances": (2, lambda: ovm.plot_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=varied or None, **target)),
        "parallel_coordinate": (2, lambda: ovm.plot_parallel_coordinate(study, **target)),
        "slice": (1, lambda: ovm.plot_slice(study, **target)),
        "pareto_front": (1, lambda: ovm.plot_pareto_front(study, target_names=metrics)
                         if len(metrics) in (2, 3) else None),
    }
    if not multi:
        del plots["pareto_front"]
    if names is not None:
        plots = {k: v for k, v in plots.items() if k in names}
    files, skipped = [], {}
    for name, (need, make) in plots.items():
        if make is None:
            skipped[name] = "drawn for one objective only"
            continue
        if name == "intermediate_values" and not any(t.intermediate_values for t in study.trials):
            skipped[name] = "no per-epoch values"
            continue
        if len(done) < need:
            skipped[name] = f"needs at least {need} completed trial{'s' if need > 1 else ''} ({len(done)} completed)"
            continue
        if name == "param_importances" and not varied:
            skipped[name] = "no parameter took two values among the completed trials"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                drawn = make()
            if drawn is None:
                skipped[name] = f"the Pareto front is drawn for 2 or 3 objectives, not {len(metrics)}"
                continue
            ax = drawn.flat[0] if isinstance(drawn, np.ndarray) else drawn
            fig = ax.figure
            width, height = fig.get_size_inches()
            if name == "intermediate_values":
                ax.set_xlabel("epoch")
                ax.set_ylabel(metrics[0])
                legend = ax.get_legend()
                if legend is not None and len(legend.get_texts()) > 12:
                    legend.remove()  # one entry per trial: unreadable beyond a dozen
            if name == "parallel_coordinate":
                width = max(width, 1.5 * (len(params) + 1) + 1.5)  # an axis per param and one for the objective
            fig.set_size_inches(max(width, 6.4), max(height, 4.2))
            files.append(save_figure(fig, out / f"{name}.png"))
        except Exception as exc:  # one figure Optuna cannot draw for this study must not cost the others
            skipped[name] = error_line(exc)[:300]
        finally:
            plt.close("all")
    return files, skipped


# ============================================================================ per search: tables and summary
def write_csv(rows: list[dict], path: Path) -> Path:
    """The trial table as CSV: one row per trial, the Parquet table's columns in its order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    return path


def profile_defaults(profile: dict, params: list[str]) -> dict:
    """What a param is when the study does not search it: the profile's model value or phase-2
    recipe value, else ``PhaseConfig``'s default."""
    from lpt_core.trainer import PhaseConfig
    recipe = PhaseConfig().to_dict()
    out = {}
    for p in params:
        if p in profile.get("model", {}):
            out[p] = profile["model"][p]
        elif p in profile.get("phase2", {}):
            out[p] = profile["phase2"][p]
        else:
            out[p] = recipe.get(p)
    return out


def prompt_file_params(path: Path) -> int | None:
    """Extra parameters of a prompt file: the number of values in its tensors (read from the header)."""
    if not path.is_file():
        return None
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return int(sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()))


def backbone_params(spec: dict) -> int | None:
    """Parameters of the profile's backbone, counted on the meta device (no weights, no download)."""
    from lpt_core import build_backbone_from_spec
    try:
        with torch.device("meta"):
            model = build_backbone_from_spec({**spec, "weights": "random"})
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:
        return None


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return html.escape(str(value))


def _range(spec: dict) -> str:
    if spec["type"] == "choice":
        return "one of " + ", ".join(str(v) for v in spec["values"])
    extra = (f", step {spec['step']}" if "step" in spec else "") + (", log" if spec.get("log") else "")
    return f"{spec['type']} {spec['low']}..{spec['high']}{extra}"


def summary_html(info: dict, figures: list[Path], skipped: dict[str, str]) -> str:
    """A short self-contained HTML page: best config against defaults, accuracy, cost, figures."""
    e = html.escape
    best, space = info.get("best"), info["space"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Search {e(info['name'])}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:1em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}"
             ".changed{background:#fff3c4}img{max-width:100%;border:1px solid #eee;margin:4px 0}"
             "small{color:#666}</style></head><body>",
             f"<h1>Search {e(info['name'])}</h1>",
             f"<p>study <b>{e(info['study'])}</b>, profile <b>{e(info['profile'])}</b>; objective "
             f"{e(', '.join(f'{m} ({d})' for m, d in zip(info['metrics'], info['modes'])))}; "
             f"{info['counts']['total']} trials: {info['counts']['completed']} completed, "
             f"{info['counts']['early_stopped']} stopped early, {info['counts']['failed']} failed"
             + (f", {n} stopped by the budget" if (n := info["counts"]["budget_stopped"]) else "")
             + f"; search wall time {_fmt(info.get('search_wall_s'), 0)} s"
             + "".join(f", {_fmt(info['cost'][m], 4)} {label}" for m, label in (("gpu_hours", "GPU-hours"),
                                                                           ("cpu_hours", "CPU-core-hours"))
                       if info["cost"].get(m)) + ".<br>"
             f"<small>MLflow experiment {e(str(info.get('experiment_id')))}, parent run "
             f"{e(str(info.get('parent_run_id')))}; table {e(str(info.get('table')))}</small></p>"]
    if best is None:
        parts.append("<p><b>No trial completed</b>: see the error column of trials.csv.</p>")
    else:
        parts.append(f"<h2>Best trial {e(best['trial_id'])}</h2><p><small>MLflow run "
                     f"{e(str(best.get('mlflow_run_id')))}; trained {best.get('epochs')} epochs in "
                     f"{_fmt(best.get('wall_s'), 1)} s wall time</small></p>")
        parts.append("<table><tr><th>parameter</th><th>searched</th><th>profile default</th><th>best</th></tr>")
        for p, spec in space.items():
            d, b = info["defaults"].get(p), best.get(p)
            cls = " class='changed'" if str(d) != str(b) else ""
            parts.append(f"<tr{cls}><td>{e(p)}</td><td>{e(_range(spec))}</td><td>{_fmt(d, 4)}</td>"
                         f"<td>{_fmt(b, 4)}</td></tr>")
        parts.append("</table>")
        parts.append("<table><tr><th>accuracy (%)</th><th>overall</th><th>many</th><th>medium</th><th>few</th></tr>")
        baseline, gain = info.get("baseline"), info.get("gain") or {}
        rows = [("validation (search)", "val_", best),
                *([(f"validation, baseline trial {e(baseline['trial_id'])} (the profile's values)", "val_", baseline)]
                  if baseline and baseline.get("status") == "completed" else []),
                *([("gain of the best over the baseline (points)", "gain_val_", gain)] if gain else []),
                ("test (best trial)", "test_", info.get("test") or {})]
        for label, prefix, values in rows:
            parts.append(f"<tr><td>{label}</td>" + "".join(
                f"<td>{_fmt(values.get(prefix + k))}</td>" for k in SHOT_KEYS) + "</tr>")
        confirm = info.get("confirm") or {}
        stale = info.get("confirmed_trial") not in (None, best["trial_id"])
        if stale:  # the search was extended without --confirm and found another best
            confirm = {}
        for label, prefix in (("test, confirmation seeds (mean ± std)", "confirm_"),
                              ("test, the baseline over the same seeds", "confirm_baseline_"),
                              ("gain over the baseline, paired by seed", "confirm_gain_")):
            if f"{prefix}test_acc_mean" in confirm:
                parts.append(f"<tr><td>{label}</td>" + "".join(
                    f"<td>{_fmt(confirm.get(f'{prefix}test_{k}_mean'))} ± {_fmt(confirm.get(f'{prefix}test_{k}_std'))}</td>"
                    for k in SHOT_KEYS) + "</tr>")
        parts.append("</table>")
        if info.get("val_images"):
            se = [f"{who} {_fmt(info.get(key))}" for who, key in (("best", "val_acc_se"), ("baseline", "baseline_val_acc_se"))
                  if info.get(key) is not None]
            parts.append(f"<p>Validation: {int(info['val_images']):,} images; one binomial standard error of "
                         f"val_acc (points): {', '.join(se)}.</p>")
        if stale:
            parts.append(f"<p>The confirmation seeds retrained trial {e(info['confirmed_trial'])}, the best before "
                         f"an extension; this best trial has not been confirmed.</p>")
        if gain and "confirm_test_acc_mean" not in confirm:
            parts.append(f"<p><b>Not confirmed.</b> The gain is measured on the validation images the best of "
                         f"{info['counts']['total']} trials (one seed each) was selected on, so it is biased upward; "
                         f"confirm it on test with fresh seeds: <code>python tune/search.py --study {e(str(info['study']))} "
                         f"--profile {e(str(info['profile']))} --resume --confirm 3</code> (with the search's own "
                         f"--set and --storage).</p>")
        if baseline and baseline.get("status") != "completed":
            parts.append(f"<p>The baseline trial {e(baseline['trial_id'])} did not run every epoch "
                         f"({e(str(baseline.get('status')))}): no gain to report.</p>")
        extra, backbone = info.get("extra_params"), info.get("backbone_params")
        if extra is not None:
            pct = f" ({100.0 * extra / backbone:.2f}% of the {backbone:,}-parameter backbone)" if backbone else ""
            parts.append(f"<p>Extra parameters of the best config (prompts, keys, head): <b>{int(extra):,}</b>{pct}.</p>")
        if info.get("pareto"):
            parts.append(f"<p>Pareto front on {e(', '.join(info['metrics']))}: {e(', '.join(info['pareto']))}</p>")
    top = info.get("top") or []
    if top:
        cols = ["trial_id", "status", "epochs", *space, *info["metrics"], *(
            k for k in ("val_many_acc", "val_medium_acc", "val_few_acc") if k not in info["metrics"]), "wall_s"]
        parts.append(f"<h2>Trials ({len(top)} best of {info['counts']['total']}; all in trials.csv)</h2><table><tr>"
                     + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
        for row in top:
            parts.append("<tr>" + "".join(f"<td>{_fmt(row.get(c), 2)}</td>" for c in cols) + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    for path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h3>{e(path.stem.replace('_', ' '))}</h3><img alt='{e(path.name)}' src='data:image/png;base64,{data}'>")
    for name, why in skipped.items():
        parts.append(f"<p><small>{e(name.replace('_', ' '))}: not drawn ({e(why)})</small></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def search_report(client, parent_run_id: str, out: str | Path, folder: str | Path | None = None) -> dict:
    """Build the search report of ``parent_run_id`` in ``out`` from MLflow and the search folder's
    ``trials.parquet`` (and its ``search.json`` / ``profile.yaml`` for the profile's defaults);
    log the files to the parent run under ``report/``. Returns what it built.

    Raises FileNotFoundError when the table is missing, KeyError for a run that is not a search."""
    from .names import TABLE_FILE
    from .trial_table import best_row, prompt_path, read_rows, status_counts
    parent = client.get_run(parent_run_id)
    tags, params, pm = parent.data.tags, parent.data.params, parent.data.metrics
    if tags.get(names.ROLE) != names.ROLE_STUDY:
        raise KeyError(f"run {parent_run_id} is not a search's parent run (lpt.role={tags.get(names.ROLE)})")
    folder = Path(folder or tags.get(names.STORAGE, ""))
    table = folder / TABLE_FILE
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no trial table")
    rows = list(read_rows(table).values())
    record = json.loads((folder / SEARCH_FILE).read_text()) if (folder / SEARCH_FILE).is_file() else {}
    study_cfg = record.get("study_config") or {}
    space = json.loads(params["space"]) if "space" in params else study_cfg.get("space", {})
    metrics, modes = objective_of(json.loads(params["objective"]) if "objective" in params
                                  else study_cfg.get("objective", {}))
    profile = record.get("profile")
    if profile is None and (folder / names.PROFILE_FILE).is_file():
        import yaml
        profile = yaml.safe_load((folder / names.PROFILE_FILE).read_text())
    profile = profile or {}

    runs = {r.data.tags.get(names.TRIAL_ID): r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.`{names.PARENT}` = '{parent_run_id}'", max_results=5000)}
    order = [tid for tid, _ in sorted(((tid, r.info.start_time or 0) for tid, r in runs.items() if tid),
                                      key=lambda x: x[1])]
    histories = {}
    if len(metrics) == 1:
        for row in rows:
            run = runs.get(row["trial_id"])
            if run is not None:
                histories[row["trial_id"]] = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metrics[0])}

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    study = build_study(rows, space, metrics, modes, histories, order)
    figures, skipped = search_figures(study, metrics, out)
    write_csv(rows, out / names.REPORT_TABLE)

    by_id = {r["trial_id"]: r for r in rows}
    best = by_id.get(tags.get(names.BEST_TRIAL_ID)) or best_row(rows, metrics[0], modes[0])
    test, extra = {}, None
    if best is not None:
        run = runs.get(best["trial_id"])
        best_metrics = run.data.metrics if run is not None else {}
        test = ({f"test_{k}": pm[f"best_test_{k}"] for k in SHOT_KEYS if f"best_test_{k}" in pm}
                or {k: v for k, v in best_metrics.items() if k.startswith("test_")})
        extra = (int(best_metrics["extra_params"]) if "extra_params" in best_metrics
                 else prompt_file_params(prompt_path(folder, best["trial_id"])))
    sign = 1 if modes[0] == "max" else -1

    def rank(r: dict) -> tuple:
        v = r.get(metrics[0])
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return (r["status"] != "completed", not ok, -sign * v if ok else 0.0)
    ranked = sorted(rows, key=rank)
    counts = status_counts(rows)
    info = {"name": tags.get(names.SEARCH, parent.info.run_name), "study": params.get("study", record.get("study")),
            "profile": params.get("profile", record.get("profile_name")), "metrics": metrics, "modes": modes,
            "counts": {**counts, "total": len(rows)}, "search_wall_s": pm.get("search_wall_s"),
            "cost": {m: pm[m] for m in ("gpu_hours", "cpu_hours") if m in pm},
            "experiment_id": parent.info.experiment_id, "parent_run_id": parent_run_id, "table": str(table),
            "space": space, "defaults": profile_defaults(profile, list(space)), "best": best, "test": test,
            "confirm": {k: v for k, v in pm.items() if k.startswith("confirm_")},
            "confirmed_trial": tags.get(names.CONFIRMED_TRIAL),
            "extra_params": extra, "backbone_params": backbone_params(profile["backbone"]) if extra and profile.get("backbone") else None,
            "pareto": [t for t in tags.get(names.PARETO_TRIALS, "").split(",") if t], "top": ranked[:10],
            "baseline": next((r for r in rows if r.get("baseline")), None),
            "gain": {k: v for k, v in pm.items() if k.startswith("gain_val_")},
            **{k: pm.get(k) for k in ("val_images", "val_acc_se", "baseline_val_acc_se")}}
    (out / names.REPORT_PAGE).write_text(summary_html(info, figures, skipped))
    files = sorted(p for p in out.iterdir() if p.is_file())
    client.log_artifacts(parent_run_id, str(out), REPORT_DIR)
    return {"out": out, "files": files, "skipped": skipped, "best": best, "study": study}


def log_search_report(client, parent_run_id: str, folder: Path, log: Callable[[str], None] = print) -> None:
    """``search_report`` into ``folder/report`` for the driver's wrap-up; a failure is a warning
    and the tag ``lpt.report_error``, never a failed search."""
    try:
        started = time.perf_counter()
        built = search_report(client, parent_run_id, Path(folder) / REPORT_DIR, folder)
        log(f"report: {built['out']} ({len(built['files'])} files, {time.perf_counter() - started:.0f} s; "
            f"rebuild with python tune/report.py)")
    except Exception as exc:  # a report is a convenience; the search's results stand without it
        log_report_error(client, parent_run_id, exc, "warning: no search report", log)
