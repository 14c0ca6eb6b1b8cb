"""The search report's page (``summary.html``): the search's settings, its best trials and figures, in
one self-contained HTML file."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from tune.config.study import SHOT_KEYS


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
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Search {e(info['name'])}</title>",
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
        + "".join(
            f", {_fmt(info['cost'][m], 4)} {label}"
            for m, label in (("gpu_hours", "GPU-hours"), ("cpu_hours", "CPU-core-hours"))
            if info["cost"].get(m)
        )
        + ".<br>"
        f"<small>MLflow experiment {e(str(info.get('experiment_id')))}, parent run "
        f"{e(str(info.get('parent_run_id')))}; table {e(str(info.get('table')))}</small></p>",
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
            d, b = info["defaults"].get(p), best.params.get(p)
            cls = " class='changed'" if str(d) != str(b) else ""
            parts.append(
                f"<tr{cls}><td>{e(p)}</td><td>{e(_range(spec))}</td><td>{_fmt(d, 4)}</td><td>{_fmt(b, 4)}</td></tr>"
            )
        parts.append("</table>")
        parts.append("<table><tr><th>accuracy (%)</th><th>overall</th><th>many</th><th>medium</th><th>few</th></tr>")
        baseline, gain = info.get("baseline"), info.get("gain") or {}
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
            (f"test (best trial; {_seen(info.get('test_exposed') or [])})", "test_", info.get("test") or {}),
        ]
        for label, prefix, values in rows:
            parts.append(
                f"<tr><td>{label}</td>"
                + "".join(f"<td>{_fmt(values.get(prefix + k))}</td>" for k in SHOT_KEYS)
                + "</tr>"
            )
        confirm = info.get("confirm") or {}
        stale = info.get("confirmed_trial") not in (None, best.trial_id)
        if stale:  # the search was extended without --confirm and found another best
            confirm = {}
        parts += _confirm_rows(confirm)
        parts.append("</table>")
        if info.get("val_images"):
            se = [
                f"{who} {_fmt(info.get(key))}"
                for who, key in (("best", "val_acc_se"), ("baseline", "baseline_val_acc_se"))
                if info.get(key) is not None
            ]
            parts.append(
                f"<p>Validation: {int(info['val_images']):,} images; one binomial standard error of "
                f"val_acc (points): {', '.join(se)}.</p>"
            )
        if stale:
            parts.append(
                f"<p>The confirmation seeds retrained trial {e(info['confirmed_trial'])}, the best before "
                f"an extension; this best trial has not been confirmed.</p>"
            )
        parts += _verdict(info, confirm, bool(gain))
        if baseline and baseline.status != "completed":
            parts.append(
                f"<p>The baseline trial {e(baseline.trial_id)} did not run every epoch "
                f"({e(str(baseline.status))}): no gain to report.</p>"
            )
        extra, backbone = info.get("extra_params"), info.get("backbone_params")
        if extra is not None:
            pct = f" ({100.0 * extra / backbone:.2f}% of the {backbone:,}-parameter backbone)" if backbone else ""
            parts.append(
                f"<p>Extra parameters of the best config (prompts, keys, head): <b>{int(extra):,}</b>{pct}.</p>"
            )
        if info.get("pareto"):
            parts.append(f"<p>Pareto front on {e(', '.join(info['metrics']))}: {e(', '.join(info['pareto']))}</p>")
    top = info.get("top") or []
    if top:
        cols = [
            "trial_id",
            "status",
            "epochs",
            *space,
            *info["metrics"],
            *(k for k in ("val_many_acc", "val_medium_acc", "val_few_acc") if k not in info["metrics"]),
            "wall_s",
        ]
        parts.append(
            f"<h2>Trials ({len(top)} best of {info['counts']['total']}; all in trials.csv)</h2><table><tr>"
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


def _verdict(info: dict, confirm: dict, gain: bool) -> list[str]:
    """One paragraph: ``Confirmed.`` only when ``--confirm``'s verdict (tag ``lpt.confirmation``) is
    so for this best trial; ``Not confirmed.`` with the reason otherwise."""
    e = html.escape
    command = (
        f"<code>python tune/search.py --study {e(str(info['study']))} --profile {e(str(info['profile']))} "
        f"--resume --confirm 5</code> (with the search's own --set and --storage)"
    )
    if "confirm_test_acc_mean" not in confirm:
        if not gain:
            return []
        return [
            f"<p><b>Not confirmed.</b> The gain is measured on the validation images the best of "
            f"{info['counts']['total']} trials (one seed each) was selected on, so it is biased upward; "
            f"confirm it on test with fresh seeds: {command}.</p>"
        ]
    low, high = confirm.get("confirm_gain_test_acc_low"), confirm.get("confirm_gain_test_acc_high")
    span = (
        f"the 95% interval of the test_acc gain (the paired t-interval over the seeds, widened by the test "
        f"set's own paired SE {_fmt(confirm.get('confirm_gain_test_acc_test_se'))}) is [{_fmt(low)}, {_fmt(high)}]"
        if low is not None and high is not None and math.isfinite(low)
        else "no interval was recorded (one seed, no gain, or a confirmation from before intervals)"
    )
    if info.get("confirmation") == "confirmed":
        return [f"<p><b>Confirmed.</b> On test, over fresh seeds, {span}: it excludes 0.</p>"]
    return [f"<p><b>Not confirmed.</b> On test, over fresh seeds, {span}. More seeds: {command}.</p>"]


def _seen(ledger: list[str]) -> str:
    """How many configs of the search the test split has seen (the parent's ``lpt.test_exposed``)."""
    if not ledger:
        return "the test-exposure ledger is empty"
    n = len(ledger)
    return f"the test split has seen {n} config{'s' * (n != 1)} of this search"
