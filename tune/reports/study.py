"""The search's trials as an Optuna study (for Optuna's plots, whatever sampler ran), and the search
figures drawn from it."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from tune import names
from tune.errors import error_line
from tune.plotting import pyplot, save_figure

if TYPE_CHECKING:  # the table module imports Ray; the report reads rows it is handed
    from matplotlib.figure import Figure

    from tune.config.space import ParamSpec
    from tune.trial.table import TrialRow


# ============================================================================ per search: Optuna study
def distributions(space: dict[str, ParamSpec], rows: list[TrialRow]) -> dict:
    """One Optuna distribution per searched param, wide enough for every value in the table
    (the trainable narrows ``top_k`` and ``group_start`` per trial; the table holds what ran)."""
    import optuna.distributions as od

    out: dict[str, od.BaseDistribution] = {}
    for name, spec in space.items():
        seen = [r.params[name] for r in rows if r.params.get(name) is not None]
        if spec.type == "choice":
            values = list(spec.values) + [v for v in seen if v not in spec.values]
            out[name] = od.CategoricalDistribution(values)
            continue
        integer = spec.type == "int"
        cast = int if integer else float
        seen = [cast(v) for v in seen if not (isinstance(v, float) and math.isnan(v))]
        low, high = cast(min([spec.low, *seen])), cast(max([spec.high, *seen]))
        log = spec.log
        step: float | None = spec.step
        if step is not None and not log and all(_on_grid(v, low, step) for v in seen):
            high = low + math.floor((high - low) / step + 1e-9) * step
            high = max(high, *seen) if seen else high
        else:
            step = None
        if integer:
            out[name] = od.IntDistribution(int(low), int(high), log=log, step=int(step or 1))
        else:
            out[name] = od.FloatDistribution(low, high, log=log, step=step)
    return out


def _on_grid(value: float, low: float, step: float) -> bool:
    k = (value - low) / step
    return abs(k - round(k)) < 1e-8  # as strict as Optuna's own check


def build_study(
    rows: list[TrialRow],
    space: dict[str, ParamSpec],
    metrics: list[str],
    modes: list[str],
    histories: dict[str, dict[int, float]] | None = None,
    order: list[str] | None = None,
):
    """An in-memory Optuna study of the search: completed trials are COMPLETE with their final
    objective values, trials that ASHA stopped are PRUNED (with their per-epoch values as
    intermediate values when ``histories`` has them), failed ones FAIL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    up, down = optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE
    directions = [up if m == "max" else down for m in modes]
    study = optuna.create_study(directions=directions, study_name="search")
    dists = distributions(space, rows)
    histories = histories or {}
    rank = {tid: i for i, tid in enumerate(order or [])}
    for row in sorted(rows, key=lambda r: (rank.get(r.trial_id, len(rank)), r.trial_id)):
        params, used = {}, {}
        for name, dist in dists.items():
            value = row.params.get(name)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            value = int(value) if isinstance(dist, optuna.distributions.IntDistribution) else value
            params[name], used[name] = value, dist
        values = [row.metric(m) for m in metrics]
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        state = {"completed": "COMPLETE", "early_stopped": "PRUNED", "budget_stopped": "PRUNED"}.get(row.status, "FAIL")
        if state == "COMPLETE" and not finite:
            state = "FAIL"
        inter = {}
        if len(metrics) == 1 and state != "FAIL":
            inter = {int(k): float(v) for k, v in histories.get(row.trial_id, {}).items() if math.isfinite(v)}
            if not inter and finite and row.epochs:
                inter = {row.epochs: float(values[0])}
        trial = optuna.trial.create_trial(
            state=getattr(optuna.trial.TrialState, state),
            values=[float(v) for v in values] if state == "COMPLETE" else None,
            params=params,
            distributions=used,
            intermediate_values=inter or None,
            user_attrs={
                names.OPTUNA_TRIAL_ID: row.trial_id,
                "status": row.status,
                "mlflow_run_id": row.mlflow_run_id or "",
            },
        )
        study.add_trial(trial)
    return study


def search_figures(
    study, metrics: list[str], out: Path, names: Sequence[str] | None = None
) -> tuple[list[Path], dict[str, str]]:
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
        "param_importances": (
            2,
            lambda: ovm.plot_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=varied or None, **target
            ),
        ),
        "parallel_coordinate": (2, lambda: ovm.plot_parallel_coordinate(study, **target)),
        "slice": (1, lambda: ovm.plot_slice(study, **target)),
        "pareto_front": (
            1,
            lambda: ovm.plot_pareto_front(study, target_names=metrics) if len(metrics) in (2, 3) else None,
        ),
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
            fig = cast("Figure", ax.figure)  # an Axes' own figure, never a SubFigure here
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
