"""The search report's page (``summary.html``): the search's settings, its best trials and figures, in
one self-contained HTML file."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tune.config.space import ParamSpec
from tune.config.study import SHOT_KEYS

if TYPE_CHECKING:  # the table module imports Ray
    from tune.trial.table import TrialRow


@dataclass(frozen=True, kw_only=True)
class TrialCounts:
    """The search's trials by status (``table.status_counts``) and in all."""

    total: int = 0
    completed: int = 0
    early_stopped: int = 0
    failed: int = 0
    interrupted: int = 0
    budget_stopped: int = 0


@dataclass(frozen=True, kw_only=True)
class SearchReport:
    """What the report page shows (``search._build_report`` reads it from MLflow and the table):
    the search's settings and counts, the best and baseline trials, the test and ``--confirm``
    metrics (``confirm``: the parent run's ``confirm_*``), the test-exposure ledger, the top rows."""

    name: str = ""
    study: str | None = None
    profile: str | None = None
    metrics: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    counts: TrialCounts = field(default_factory=TrialCounts)
    search_wall_s: float | None = None
    gpu_hours: float | None = None
    cpu_hours: float | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    table: str | None = None
    space: dict[str, ParamSpec] = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)
    best: TrialRow | None = None
    test: dict[str, float] = field(default_factory=dict)
    confirm: dict[str, float] = field(default_factory=dict)
    confirmed_trial: str | None = None
    confirmation: str | None = None
    test_exposed: list[str] = field(default_factory=list)
    extra_params: int | None = None
    backbone_params: int | None = None
    pareto: list[str] = field(default_factory=list)
    top: list[TrialRow] = field(default_factory=list)
    baseline: TrialRow | None = None
    gain: dict[str, float] = field(default_factory=dict)
    val_images: float | None = None
    val_acc_se: float | None = None
    baseline_val_acc_se: float | None = None


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    return html.escape(str(value))


def _range(spec: ParamSpec) -> str:
    if spec.type == "choice":
        return "one of " + ", ".join(str(v) for v in spec.values)
    extra = (f", step {spec.step}" if spec.step is not None else "") + (", log" if spec.log else "")
    return f"{spec.type} {spec.low}..{spec.high}{extra}"


def summary_html(info: SearchReport, figures: list[Path], skipped: dict[str, str]) -> str:
    """A short self-contained HTML page: best config against defaults, accuracy, cost, figures."""
    e = html.escape
    best, space, counts = info.best, info.space, info.counts
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Search {e(info.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:1em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}"
        ".changed{background:#fff3c4}img{max-width:100%;border:1px solid #eee;margin:4px 0}"
        "small{color:#666}</style></head><body>",
        f"<h1>Search {e(info.name)}</h1>",
        f"<p>study <b>{e(str(info.study))}</b>, profile <b>{e(str(info.profile))}</b>; objective "
        f"{e(', '.join(f'{m} ({d})' for m, d in zip(info.metrics, info.modes)))}; "
        f"{counts.total} trials: {counts.completed} completed, "
        f"{counts.early_stopped} stopped early, {counts.failed} failed"
        + (f", {n} stopped by the budget" if (n := counts.budget_stopped) else "")
        + f"; search wall time {_fmt(info.search_wall_s, 0)} s"
        + "".join(
            f", {_fmt(v, 4)} {label}"
            for v, label in ((info.gpu_hours, "GPU-hours"), (info.cpu_hours, "CPU-core-hours"))
            if v
        )
        + ".<br>"
        f"<small>MLflow experiment {e(str(info.experiment_id))}, parent run "
        f"{e(str(info.parent_run_id))}; table {e(str(info.table))}</small></p>",
    ]
    if best is None:
        parts.append("<p><b>No trial completed</b>: see the error column of trials.csv.</p>")
    else:
        parts.append(
            f"<h2>Best trial {e(best.trial_id)}</h2><p><small>MLflow run "
            f"{e(str(best.mlflow_run_id))}; trained {best.epochs} epochs in "
            f"{_fmt(best.wall_s, 1)} s wall time</small></p>"
        )
        parts.append("<table><tr><th>parameter</th><th>searched</th><th>profile default</th><th>best</th></tr>")
        for p, spec in space.items():
            d, b = info.defaults.get(p), best.params.get(p)
            cls = " class='changed'" if str(d) != str(b) else ""
            parts.append(
                f"<tr{cls}><td>{e(p)}</td><td>{e(_range(spec))}</td><td>{_fmt(d, 4)}</td><td>{_fmt(b, 4)}</td></tr>"
            )
        parts.append("</table>")
        parts.append("<table><tr><th>accuracy (%)</th><th>overall</th><th>many</th><th>medium</th><th>few</th></tr>")
        baseline, gain = info.baseline, info.gain
        rows = [
            ("validation (search)", "val_", best.metrics()),
            *(
                [
                    (
                        f"validation, baseline trial {e(baseline.trial_id)} (the profile's values)",
                        "val_",
                        baseline.metrics(),
                    )
                ]
                if baseline and baseline.status == "completed"
                else []
            ),
            *([("gain of the best over the baseline (points)", "gain_val_", gain)] if gain else []),
            (f"test (best trial; {_seen(info.test_exposed)})", "test_", info.test),
        ]
        for label, prefix, values in rows:
            parts.append(
                f"<tr><td>{label}</td>"
                + "".join(f"<td>{_fmt(values.get(prefix + k))}</td>" for k in SHOT_KEYS)
                + "</tr>"
            )
        confirm = info.confirm
        stale = info.confirmed_trial not in (None, best.trial_id)
        if stale:  # the search was extended without --confirm and found another best
            confirm = {}
        parts += _confirm_rows(confirm)
        parts.append("</table>")
        if info.val_images:
            se = [
                f"{who} {_fmt(v)}"
                for who, v in (("best", info.val_acc_se), ("baseline", info.baseline_val_acc_se))
                if v is not None
            ]
            parts.append(
                f"<p>Validation: {int(info.val_images):,} images; one binomial standard error of "
                f"val_acc (points): {', '.join(se)}.</p>"
            )
        if stale:
            parts.append(
                f"<p>The confirmation seeds retrained trial {e(str(info.confirmed_trial))}, the best before "
                f"an extension; this best trial has not been confirmed.</p>"
            )
        parts += _verdict(info, confirm, bool(gain))
        if baseline and baseline.status != "completed":
            parts.append(
                f"<p>The baseline trial {e(baseline.trial_id)} did not run every epoch "
                f"({e(str(baseline.status))}): no gain to report.</p>"
            )
        extra, backbone = info.extra_params, info.backbone_params
        if extra is not None:
            pct = f" ({100.0 * extra / backbone:.2f}% of the {backbone:,}-parameter backbone)" if backbone else ""
            parts.append(
                f"<p>Extra parameters of the best config (prompts, keys, head): <b>{int(extra):,}</b>{pct}.</p>"
            )
        if info.pareto:
            parts.append(f"<p>Pareto front on {e(', '.join(info.metrics))}: {e(', '.join(info.pareto))}</p>")
    top = info.top
    if top:
        cols = [
            "trial_id",
            "status",
            "epochs",
            *space,
            *info.metrics,
            *(k for k in ("val_many_acc", "val_medium_acc", "val_few_acc") if k not in info.metrics),
            "wall_s",
        ]
        parts.append(
            f"<h2>Trials ({len(top)} best of {counts.total}; all in trials.csv)</h2><table><tr>"
            + "".join(f"<th>{e(c)}</th>" for c in cols)
            + "</tr>"
        )
        for row in top:
            parts.append("<tr>" + "".join(f"<td>{_fmt(row.value(c), 2)}</td>" for c in cols) + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    for path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(
            f"<h3>{e(path.stem.replace('_', ' '))}</h3><img alt='{e(path.name)}' src='data:image/png;base64,{data}'>"
        )
    for name, why in skipped.items():
        parts.append(f"<p><small>{e(name.replace('_', ' '))}: not drawn ({e(why)})</small></p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _confirm_rows(confirm: dict) -> list[str]:
    """``--confirm``'s rows: the best and the baseline (mean ± SE over the seeds) and the gain paired
    by seed (mean, its 95% interval with the test set's own SE)."""
    rows = []
    n = confirm.get("confirm_seeds")
    seeds = f"{int(n)} seeds" if n else "the seeds"
    for label, prefix in (
        (f"test, confirmation over {seeds} (mean ± SE)", "confirm_"),
        ("test, the baseline over the same seeds", "confirm_baseline_"),
    ):
        if f"{prefix}test_acc_mean" in confirm:
            rows.append(
                f"<tr><td>{label}</td>"
                + "".join(
                    f"<td>{_fmt(confirm.get(f'{prefix}test_{k}_mean'))} ± "
                    f"{_fmt(confirm.get(f'{prefix}test_{k}_se', confirm.get(f'{prefix}test_{k}_std')))}</td>"
                    for k in SHOT_KEYS
                )
                + "</tr>"
            )
    if "confirm_gain_test_acc_mean" in confirm:
        cells = []
        for k in SHOT_KEYS:
            low, high = confirm.get(f"confirm_gain_test_{k}_low"), confirm.get(f"confirm_gain_test_{k}_high")
            span = f" [{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else ""
            cells.append(f"<td>{_fmt(confirm.get(f'confirm_gain_test_{k}_mean'))}{span}</td>")
        rows.append("<tr><td>gain over the baseline, paired by seed (95% interval)</td>" + "".join(cells) + "</tr>")
    return rows


def _verdict(info: SearchReport, confirm: dict, gain: bool) -> list[str]:
    """One paragraph: ``Confirmed.`` only when ``--confirm``'s verdict (tag ``lpt.confirmation``) is
    so for this best trial; ``Not confirmed.`` with the reason otherwise."""
    e = html.escape
    command = (
        f"<code>python tune/search.py --study {e(str(info.study))} --profile {e(str(info.profile))} "
        f"--resume --confirm 5</code> (with the search's own --set and --storage)"
    )
    if "confirm_test_acc_mean" not in confirm:
        if not gain:
            return []
        return [
            f"<p><b>Not confirmed.</b> The gain is measured on the validation images the best of "
            f"{info.counts.total} trials (one seed each) was selected on, so it is biased upward; "
            f"confirm it on test with fresh seeds: {command}.</p>"
        ]
    low, high = confirm.get("confirm_gain_test_acc_low"), confirm.get("confirm_gain_test_acc_high")
    span = (
        f"the 95% interval of the test_acc gain (the paired t-interval over the seeds, widened by the test "
        f"set's own paired SE {_fmt(confirm.get('confirm_gain_test_acc_test_se'))}) is [{_fmt(low)}, {_fmt(high)}]"
        if low is not None and high is not None and math.isfinite(low)
        else "no interval was recorded (one seed, no gain, or a confirmation from before intervals)"
    )
    if info.confirmation == "confirmed":
        return [f"<p><b>Confirmed.</b> On test, over fresh seeds, {span}: it excludes 0.</p>"]
    return [f"<p><b>Not confirmed.</b> On test, over fresh seeds, {span}. More seeds: {command}.</p>"]


def _seen(ledger: list[str]) -> str:
    """How many configs of the search the test split has seen (the parent's ``lpt.test_exposed``)."""
    if not ledger:
        return "the test-exposure ledger is empty"
    n = len(ledger)
    return f"the test split has seen {n} config{'s' * (n != 1)} of this search"
