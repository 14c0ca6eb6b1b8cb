"""Figures and reports of a search, as MLflow artifacts (PNG through matplotlib's Agg backend, CSV, HTML).

Per trial (``log_trial_report``, called by the trainable after the last epoch, before its final
``tune.report``), from one pass of the final model over the validation split:

- ``per_class_accuracy.png``: per-class validation accuracy against train images per class (log x),
  the many / medium / few bands shaded and each band's accuracy drawn across it;
- ``shot_accuracy.png``: overall / many / medium / few accuracy of the final model against the
  phase-1 model it started from (read from the phase-1 MLflow run's last epoch);
- ``prompt_usage.png``: which group prompts the images of each class select (classes sorted by
  train frequency, rows normalised), with the pool's share per prompt on top; the normalised
  entropy of that share is logged as the metric ``prompt_usage_entropy`` (1: every prompt used
  equally, 0: one prompt takes everything);
- ``shot_confusion.png``: how often images of many / medium / few classes are predicted as a class
  of each group (row-normalised; the diagonal includes the correct predictions);
- ``val_diagnostics.json``: the numbers behind them (per-class accuracy, train counts, the [3, 3]
  confusion, the [C, P] prompt usage counts, the phase-1 metrics).

Per search (``search_report``, called by the driver's wrap-up and by ``tune/report.py``), from the
parent MLflow run, the trial runs and ``trials.parquet`` alone: an in-memory Optuna study rebuilt
from the table (``build_study``) drawn with ``optuna.visualization.matplotlib`` (optimisation
history, learning curves, parameter importances, parallel coordinates, slices, Pareto front for
several objectives), ``trials.csv`` and ``summary.html`` (best config against the profile's
defaults, accuracy with many/medium/few, extra parameters, wall time, the figures inline).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from lpt_core.metrics import FEW_BELOW, MANY_ABOVE, confusion_counts, per_class_accuracy, shot_accuracy, shot_groups

from . import mlflow_tracking as mt

GROUPS = ("many", "medium", "few")
GROUP_COLORS = {"many": "#4c72b0", "medium": "#dd8452", "few": "#c44e52"}
REPORT_DIR = "report"  # artifact folder in the trial and parent runs
SHOT_KEYS = ("acc", "many_acc", "medium_acc", "few_acc")
SHOT_LABELS = ("overall", "many", "medium", "few")


def _pyplot():
    """pyplot on the Agg backend (headless), imported on first use: trials import this module."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


# ============================================================================ per trial: numbers
@torch.no_grad()
def predict(model, loader, device: torch.device, batch_transform: Callable | None = None) -> dict:
    """Predicted class, label and (phase 2) selected prompt indices of every image of ``loader``,
    computed as ``lpt_core.evaluate`` computes them (eval mode, bf16 autocast on CUDA)."""
    from lpt_core.trainer import to_device
    was_training = model.training
    model.eval()
    preds, labels, idx = [], [], []
    for images, y in loader:
        images, y = to_device(images, y, device, batch_transform)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, aux = model(images)
        preds.append(logits.argmax(dim=1))
        labels.append(y)
        if "prompt_idx" in aux:
            idx.append(aux["prompt_idx"])
    model.train(was_training)
    return {"preds": torch.cat(preds).cpu(), "labels": torch.cat(labels).cpu(),
            "prompt_idx": torch.cat(idx).cpu() if idx else None}


def class_groups(class_counts: Sequence[int]) -> np.ndarray:
    """Index into ``GROUPS`` (0 many, 1 medium, 2 few) of every class."""
    masks = shot_groups(class_counts)
    out = np.zeros(len(class_counts), dtype=np.int64)
    for g, name in enumerate(GROUPS):
        out[masks[name].numpy()] = g
    return out


def shot_confusion(preds, labels, class_counts: Sequence[int]) -> np.ndarray:
    """[3, 3] counts: images of a many/medium/few class (rows) predicted as a class of each group (columns)."""
    group = class_groups(class_counts)
    preds, labels = np.asarray(preds, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    out = np.zeros((3, 3), dtype=np.int64)
    np.add.at(out, (group[labels], group[preds]), 1)
    return out


def prompt_usage(labels, prompt_idx, num_classes: int, pool_size: int) -> np.ndarray:
    """[C, P] counts: how often images of each class selected each group prompt."""
    usage = np.zeros((num_classes, pool_size), dtype=np.int64)
    idx = np.asarray(prompt_idx, dtype=np.int64)
    rows = np.repeat(np.asarray(labels, dtype=np.int64), idx.shape[1])
    np.add.at(usage, (rows, idx.reshape(-1)), 1)
    return usage


def usage_entropy(usage) -> float:
    """Entropy of the pool's usage share per prompt, divided by log(pool size): 1 when every
    prompt is selected equally often, 0 when one prompt takes every selection (or the pool has one)."""
    totals = np.asarray(usage, dtype=np.float64).sum(axis=0)
    if totals.size < 2 or totals.sum() <= 0:
        return 0.0
    p = totals[totals > 0] / totals.sum()
    return float(max(0.0, -(p * np.log(p)).sum() / math.log(totals.size)))


def diagnostics(pred: dict, class_counts: Sequence[int], pool_size: int | None = None) -> dict:
    """Shot accuracy, per-class accuracy, group confusion and prompt usage from ``predict``'s output."""
    preds, labels = pred["preds"], pred["labels"]
    c = len(class_counts)
    correct, total = confusion_counts(preds, labels, c)
    out = shot_accuracy(correct, total, class_counts)
    out["per_class"] = per_class_accuracy(correct.double(), total.double()).tolist()
    out["class_counts"] = [int(n) for n in class_counts]
    out["shot_confusion"] = shot_confusion(preds, labels, class_counts).tolist()
    if pred.get("prompt_idx") is not None:
        usage = prompt_usage(labels, pred["prompt_idx"], c, pool_size or int(pred["prompt_idx"].max()) + 1)
        out["prompt_usage"] = usage
        out["prompt_usage_entropy"] = usage_entropy(usage)
    return out


# ============================================================================ per trial: figures
def _band_edges() -> dict[str, tuple[float, float]]:
    return {"few": (0.0, FEW_BELOW - 0.5), "medium": (FEW_BELOW - 0.5, MANY_ABOVE + 0.5),
            "many": (MANY_ABOVE + 0.5, math.inf)}


def plot_per_class(per_class: Sequence[float], class_counts: Sequence[int], path: Path,
                   shot: dict | None = None, title: str = "") -> Path:
    """Per-class accuracy (%) against train images per class, log x, shot bands shaded."""
    plt = _pyplot()
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 0.8)
    acc = np.asarray(per_class, dtype=np.float64)
    lo, hi = counts.min() / 1.4, counts.max() * 1.4
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, (a, b) in _band_edges().items():
        a, b = max(a, lo), min(b, hi)
        if a >= b:
            continue
        ax.axvspan(a, b, color=GROUP_COLORS[name], alpha=0.10, lw=0)
        ax.text(math.sqrt(a * b), 103, name, ha="center", va="bottom", fontsize=9, color=GROUP_COLORS[name])
        if shot and not math.isnan(shot.get(f"{name}_acc", math.nan)):
            ax.hlines(shot[f"{name}_acc"], a, b, colors=GROUP_COLORS[name], linestyles="--", lw=1.2)
    ok = ~np.isnan(acc)
    group = class_groups(class_counts)
    ax.scatter(counts[ok], acc[ok], s=14, c=[GROUP_COLORS[GROUPS[g]] for g in group[ok]],
               edgecolors="black", linewidths=0.3, zorder=3)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(-3, 112)
    ax.set_xlabel("train images of the class (log scale)")
    ax.set_ylabel("validation accuracy of the class (%)")
    ax.set_title(title or "Per-class validation accuracy against class frequency", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if shot:
        ax.plot([], [], "k--", lw=1.2, label="group accuracy (over its images)")
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_shot_bars(final: dict, phase1: dict | None, path: Path, title: str = "") -> Path:
    """Overall / many / medium / few validation accuracy: the phase-1 model and the final model."""
    plt = _pyplot()
    x = np.arange(len(SHOT_KEYS))
    series = [("phase 1 (shared prompts)", phase1, "#9e9e9e"), ("final (phase 2)", final, "#4c72b0")]
    series = [s for s in series if s[1]]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (label, values, color) in enumerate(series):
        ys = np.array([values.get(k, math.nan) for k in SHOT_KEYS], dtype=np.float64)
        xs = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(xs[~np.isnan(ys)], ys[~np.isnan(ys)], width * 0.95, label=label, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=1)
        for xv in xs[np.isnan(ys)]:
            ax.text(xv, 1, "n/a", ha="center", fontsize=8)
    ax.set_xticks(x, SHOT_LABELS)
    ax.set_ylim(0, 112)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title or ("Shot accuracy: final model against phase 1" if phase1 else
                           "Shot accuracy of the final model (no phase-1 metrics found)"), fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8, ncol=len(series), frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_prompt_usage(usage, class_counts: Sequence[int], path: Path, class_names: Sequence[str] | None = None,
                      title: str = "") -> Path:
    """Heatmap of prompt selections: classes by train frequency (most frequent on top) x group prompts."""
    plt = _pyplot()
    usage = np.asarray(usage, dtype=np.float64)
    c, p = usage.shape
    order = np.argsort(-np.asarray(class_counts), kind="stable")
    rows = usage[order]
    frac = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1)
    share = 100 * usage.sum(axis=0) / max(usage.sum(), 1)
    height = min(max(3.0, 0.22 * c), 11.0) + 1.4
    width = min(max(5.5, 0.35 * p + 2.5), 14)
    fig, (top, ax) = plt.subplots(2, 1, figsize=(width, height), sharex=True,
                                  gridspec_kw={"height_ratios": [1.2, max(3.0, height - 1.4)], "hspace": 0.05})
    top.bar(np.arange(p), share, color="#4c72b0", width=0.85)
    top.set_ylabel("pool\nshare %", fontsize=8)
    top.tick_params(labelsize=7)
    top.grid(True, axis="y", alpha=0.3)
    top.set_title(title or f"Prompt usage on the validation split (entropy {usage_entropy(usage):.2f})",
                  fontsize=10)
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=max(frac.max(), 1e-9),
                   interpolation="nearest")
    ax.set_xlabel("group prompt")
    ax.set_xticks(np.arange(p) if p <= 40 else np.linspace(0, p - 1, 10).astype(int))
    ax.set_ylabel("class (most train images first)")
    if c <= 40:
        names = class_names or [str(i) for i in range(c)]
        ax.set_yticks(np.arange(c), [f"{names[i]} ({class_counts[i]})" for i in order], fontsize=7)
    else:
        ax.set_yticks([])
    group = class_groups(class_counts)[order]
    for g in range(3):
        where = np.flatnonzero(group == g)
        if where.size:
            if where[0] > 0:
                ax.axhline(where[0] - 0.5, color="white", lw=1.5)
            ax.text(p - 0.4, (where[0] + where[-1]) / 2, f" {GROUPS[g]}", va="center", ha="left",
                    fontsize=9, color=GROUP_COLORS[GROUPS[g]], clip_on=False)
    cbar = fig.colorbar(im, ax=[top, ax], fraction=0.04, pad=0.8 / width)  # room for the group names
    cbar.set_label("share of the class's selections", fontsize=8)
    return _save(fig, path)


def plot_shot_confusion(matrix, path: Path, title: str = "") -> Path:
    """3x3 heatmap: images of many/medium/few classes (rows) predicted as many/medium/few classes."""
    plt = _pyplot()
    m = np.asarray(matrix, dtype=np.float64)
    totals = m.sum(axis=1, keepdims=True)
    pct = np.where(totals > 0, 100 * m / np.maximum(totals, 1), np.nan)
    fig, ax = plt.subplots(figsize=(4.8, 4.0))
    ax.imshow(np.nan_to_num(pct, nan=0.0), cmap="Blues", vmin=0, vmax=100)
    for i in range(3):
        for j in range(3):
            text = "–" if np.isnan(pct[i, j]) else f"{pct[i, j]:.1f}%\n({int(m[i, j])})"
            dark = not np.isnan(pct[i, j]) and pct[i, j] > 55
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(3), [f"{g}" for g in GROUPS])
    ax.set_yticks(range(3), [f"{g}\n({int(t)} img)" for g, t in zip(GROUPS, totals[:, 0])])
    ax.set_xlabel("predicted class is in group")
    ax.set_ylabel("true class is in group")
    ax.set_title(title or "Head-vs-tail confusion on the validation split", fontsize=10)
    return _save(fig, path)


def write_trial_figures(diag: dict, out: Path, phase1: dict | None = None,
                        class_names: Sequence[str] | None = None, label: str = "") -> list[Path]:
    """The trial's PNGs and ``val_diagnostics.json`` in ``out`` from ``diagnostics``' output."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = diag["class_counts"]
    shot = {k: diag[k] for k in SHOT_KEYS}
    suffix = f" ({label})" if label else ""
    files = [plot_per_class(diag["per_class"], counts, out / "per_class_accuracy.png", shot,
                            f"Per-class validation accuracy against class frequency{suffix}"),
             plot_shot_bars(shot, phase1, out / "shot_accuracy.png"),
             plot_shot_confusion(diag["shot_confusion"], out / "shot_confusion.png",
                                 f"Head-vs-tail confusion on the validation split{suffix}")]
    if "prompt_usage" in diag:
        files.append(plot_prompt_usage(diag["prompt_usage"], counts, out / "prompt_usage.png", class_names,
                                       f"Prompt usage on the validation split{suffix}, entropy "
                                       f"{diag['prompt_usage_entropy']:.2f}"))
    numbers = dict(diag)
    if "prompt_usage" in diag:
        numbers["prompt_usage_per_prompt"] = np.asarray(diag["prompt_usage"]).sum(axis=0).tolist()
    numbers["phase1"] = phase1
    numbers["groups"] = list(GROUPS)
    path = out / "val_diagnostics.json"
    plain = _plain(numbers)  # one key a line, each value compact (the usage matrix has C x P numbers)
    path.write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in plain.items()) + "\n}\n")
    return [*files, path]


def _plain(value):
    """JSON-ready: arrays as lists, NaN as null (strict JSON for any reader)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def phase1_val_metrics(client, experiment_id: str, phase1_key: str) -> dict | None:
    """Validation shot accuracy of the phase-1 model: its MLflow run's last logged epoch."""
    run_id = mt.find_run(client, experiment_id, **{mt.ROLE: "phase1", mt.PHASE1_KEY: phase1_key})
    if run_id is None:
        return None
    metrics = client.get_run(run_id).data.metrics
    found = {k: metrics[f"val_{k}"] for k in SHOT_KEYS if f"val_{k}" in metrics}
    return found or None


def log_trial_report(client, run_id: str, trainer, experiment_id: str, phase1_key: str,
                     log: Callable[[str], None] = print) -> dict:
    """Build the trial's figures from one validation pass of ``trainer``'s model and log them to
    ``run_id`` under ``report/`` with ``prompt_usage_entropy`` and the extra parameter count.
    Best effort: a failure is logged as the tag ``lpt.report_error`` and never fails the trial."""
    try:
        started = time.perf_counter()
        model, data = trainer.model, trainer.data
        pred = predict(model, trainer.val_loader, trainer.device, data.eval_batch_transform)
        diag = diagnostics(pred, trainer.class_counts, getattr(model, "pool_size", None))
        phase1 = phase1_val_metrics(client, experiment_id, phase1_key)
        counts = model.parameter_counts()
        metrics = {"extra_params": counts["extra_params"], "extra_percent": counts["extra_percent"]}
        if "prompt_usage_entropy" in diag:
            metrics["prompt_usage_entropy"] = diag["prompt_usage_entropy"]
        with tempfile.TemporaryDirectory() as folder:
            write_trial_figures(diag, Path(folder), phase1, getattr(data, "class_names", None),
                                f"epoch {trainer.epoch}")
            client.log_artifacts(run_id, folder, REPORT_DIR)
        mt.log(client, run_id, metrics=metrics, step=trainer.epoch)
        log(f"report: validation figures logged ({time.perf_counter() - started:.1f} s)")
        return metrics
    except Exception as exc:  # figures are a convenience; the trial's result stands without them
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        log(f"report: no validation figures ({reason})")
        try:
            mt.log(client, run_id, tags={"lpt.report_error": reason})
        except Exception:
            pass
        return {}


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
        state = {"completed": "COMPLETE", "early_stopped": "PRUNED"}.get(row["status"], "FAIL")
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
            user_attrs={"trial_id": row["trial_id"], "status": row["status"],
                        "mlflow_run_id": row.get("mlflow_run_id") or ""})
        study.add_trial(trial)
    return study


def search_figures(study, metrics: list[str], out: Path,
                   names: Sequence[str] | None = None) -> tuple[list[Path], dict[str, str]]:
    """Optuna's matplotlib figures of ``study`` (all, or ``names``) as PNGs in ``out``;
    returns (files, {name: why it was not drawn})."""
    plt = _pyplot()  # Agg before Optuna's module imports pyplot
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
            files.append(_save(fig, out / f"{name}.png"))
        except Exception as exc:  # one figure Optuna cannot draw for this study must not cost the others
            skipped[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
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
    try:
        import timm
        spec = dict(spec)
        name = spec.pop("name")
        spec.pop("weights", None)
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0, **spec)
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
             f"{info['counts']['early_stopped']} stopped early, {info['counts']['failed']} failed; "
             f"search wall time {_fmt(info.get('search_wall_s'), 0)} s.<br>"
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
        for label, prefix, values in (("validation (search)", "val_", best), ("test (best trial)", "test_", info.get("test") or {})):
            parts.append(f"<tr><td>{label}</td>" + "".join(
                f"<td>{_fmt(values.get(prefix + k))}</td>" for k in SHOT_KEYS) + "</tr>")
        confirm = info.get("confirm") or {}
        if confirm:
            parts.append("<tr><td>test, confirmation seeds (mean ± std)</td>" + "".join(
                f"<td>{_fmt(confirm.get(f'confirm_test_{k}_mean'))} ± {_fmt(confirm.get(f'confirm_test_{k}_std'))}</td>"
                for k in SHOT_KEYS) + "</tr>")
        parts.append("</table>")
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


def _best_row(rows: list[dict], metric: str, mode: str, tag: str | None) -> dict | None:
    by_id = {r["trial_id"]: r for r in rows}
    if tag and tag in by_id:
        return by_id[tag]
    done = [r for r in rows if r["status"] == "completed" and math.isfinite(r.get(metric) or math.nan)]
    if not done:
        return None
    sign = 1 if mode == "max" else -1
    return max(done, key=lambda r: sign * r[metric])


def search_report(client, parent_run_id: str, out: str | Path, folder: str | Path | None = None,
                  log_artifacts: bool = True) -> dict:
    """Build the search report of ``parent_run_id`` in ``out`` from MLflow and the search folder's
    ``trials.parquet`` (and its ``search.json`` / ``profile.yaml`` for the profile's defaults);
    log the files to the parent run under ``report/``. Returns what it built.

    Raises FileNotFoundError when the table is missing, KeyError for a run that is not a search."""
    from .trial_table import read_rows
    parent = client.get_run(parent_run_id)
    tags, params, pm = parent.data.tags, parent.data.params, parent.data.metrics
    if tags.get(mt.ROLE) != "study":
        raise KeyError(f"run {parent_run_id} is not a search's parent run (lpt.role={tags.get(mt.ROLE)})")
    folder = Path(folder or tags.get("lpt.storage", ""))
    table = folder / "trials.parquet"
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no trial table")
    rows = list(read_rows(table).values())
    record = json.loads((folder / "search.json").read_text()) if (folder / "search.json").is_file() else {}
    study_cfg = record.get("study_config") or {}
    space = json.loads(params["space"]) if "space" in params else study_cfg.get("space", {})
    objective = json.loads(params["objective"]) if "objective" in params else study_cfg.get("objective", {})
    metrics = list(objective.get("metrics") or [objective.get("metric", "val_acc")])
    modes = list(objective.get("modes") or [objective.get("mode", "max")])
    profile = record.get("profile")
    if profile is None and (folder / "profile.yaml").is_file():
        import yaml
        profile = yaml.safe_load((folder / "profile.yaml").read_text())
    profile = profile or {}

    runs = {r.data.tags.get(mt.TRIAL_ID): r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.`{mt.PARENT}` = '{parent_run_id}'", max_results=5000)}
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
    write_csv(rows, out / "trials.csv")

    best = _best_row(rows, metrics[0], modes[0], tags.get("lpt.best_trial_id"))
    test = {}
    if best is not None:
        test = {f"test_{k}": pm[f"best_test_{k}"] for k in SHOT_KEYS if f"best_test_{k}" in pm}
        run = runs.get(best["trial_id"])
        if not test and run is not None:
            test = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    extra = None
    if best is not None:
        run = runs.get(best["trial_id"])
        if run is not None and "extra_params" in run.data.metrics:
            extra = int(run.data.metrics["extra_params"])
        else:
            extra = prompt_file_params(folder / "prompts" / f"{best['trial_id']}.safetensors")
    sign = 1 if modes[0] == "max" else -1

    def rank(r: dict) -> tuple:
        v = r.get(metrics[0])
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return (r["status"] != "completed", not ok, -sign * v if ok else 0.0)
    ranked = sorted(rows, key=rank)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "failed")}
    info = {"name": tags.get("lpt.search", parent.info.run_name), "study": params.get("study", record.get("study")),
            "profile": params.get("profile", record.get("profile_name")), "metrics": metrics, "modes": modes,
            "counts": {**counts, "total": len(rows)}, "search_wall_s": pm.get("search_wall_s"),
            "experiment_id": parent.info.experiment_id, "parent_run_id": parent_run_id, "table": str(table),
            "space": space, "defaults": profile_defaults(profile, list(space)), "best": best, "test": test,
            "confirm": {k: v for k, v in pm.items() if k.startswith("confirm_")},
            "extra_params": extra, "backbone_params": backbone_params(profile["backbone"]) if extra and profile.get("backbone") else None,
            "pareto": [t for t in tags.get("lpt.pareto_trials", "").split(",") if t], "top": ranked[:10]}
    (out / "summary.html").write_text(summary_html(info, figures, skipped))
    files = sorted(p for p in out.iterdir() if p.is_file())
    if log_artifacts:
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
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        log(f"warning: no search report ({reason})")
        try:
            mt.log(client, parent_run_id, tags={"lpt.report_error": reason})
        except Exception:
            pass
