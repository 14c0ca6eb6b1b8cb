"""The trial report's figures: per-class accuracy against training images, accuracy by shot group,
prompt usage and the shot-group confusion."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lpt_core.metrics import GROUPS, MANY_ABOVE, few_at_most
from tune.config.study import SHOT_KEYS
from tune.plotting import pyplot, save_figure
from tune.trial.diagnostics import Diagnostics, _plain, class_groups, usage_entropy

GROUP_COLORS = {"many": "#4c72b0", "medium": "#dd8452", "few": "#c44e52"}


SHOT_LABELS = ("overall", "many", "medium", "few")


# ============================================================================ per trial: figures
def _band_edges(split: str = "standard") -> dict[str, tuple[float, float]]:
    few = few_at_most(split) + 0.5
    return {"few": (0.0, few), "medium": (few, MANY_ABOVE + 0.5), "many": (MANY_ABOVE + 0.5, math.inf)}


def plot_per_class(
    per_class: Sequence[float],
    class_counts: Sequence[int],
    path: Path,
    shot: dict | None = None,
    title: str = "",
    split: str = "standard",
) -> Path:
    """Per-class accuracy (%) against train images per class, log x, shot bands shaded."""
    plt = pyplot()
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 0.8)
    acc = np.asarray(per_class, dtype=np.float64)
    lo, hi = counts.min() / 1.4, counts.max() * 1.4
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for name, (a, b) in _band_edges(split).items():
        a, b = max(a, lo), min(b, hi)
        if a >= b:
            continue
        ax.axvspan(a, b, color=GROUP_COLORS[name], alpha=0.10, lw=0)
        ax.text(math.sqrt(a * b), 103, name, ha="center", va="bottom", fontsize=9, color=GROUP_COLORS[name])
        if shot and not math.isnan(shot.get(f"{name}_acc", math.nan)):
            ax.hlines(shot[f"{name}_acc"], a, b, colors=GROUP_COLORS[name], linestyles="--", lw=1.2)
    ok = ~np.isnan(acc)
    group = class_groups(class_counts, split)
    ax.scatter(
        counts[ok],
        acc[ok],
        s=14,
        c=[GROUP_COLORS[GROUPS[g]] for g in group[ok]],
        edgecolors="black",
        linewidths=0.3,
        zorder=3,
    )
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
    return save_figure(fig, path)


def plot_shot_bars(final: dict, phase1: dict | None, path: Path, title: str = "") -> Path:
    """Overall / many / medium / few validation accuracy: the phase-1 model and the final model."""
    plt = pyplot()
    x = np.arange(len(SHOT_KEYS))
    given = [("phase 1 (shared prompts)", phase1, "#9e9e9e"), ("final (phase 2)", final, "#4c72b0")]
    series = [(label, values, color) for label, values, color in given if values]
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
    ax.set_title(
        title
        or (
            "Shot accuracy: final model against phase 1"
            if phase1
            else "Shot accuracy of the final model (no phase-1 metrics found)"
        ),
        fontsize=10,
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8, ncol=len(series), frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_prompt_usage(
    usage,
    class_counts: Sequence[int],
    path: Path,
    class_names: Sequence[str] | None = None,
    title: str = "",
    split: str = "standard",
) -> Path:
    """Heatmap of prompt selections: classes by train frequency (most frequent on top) x group prompts."""
    plt = pyplot()
    usage = np.asarray(usage, dtype=np.float64)
    c, p = usage.shape
    order = np.argsort(-np.asarray(class_counts), kind="stable")
    rows = usage[order]
    frac = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1)
    share = 100 * usage.sum(axis=0) / max(usage.sum(), 1)
    height = min(max(3.0, 0.22 * c), 11.0) + 1.4
    width = min(max(5.5, 0.35 * p + 2.5), 14)
    fig, (top, ax) = plt.subplots(
        2,
        1,
        figsize=(width, height),
        sharex=True,
        gridspec_kw={"height_ratios": [1.2, max(3.0, height - 1.4)], "hspace": 0.05},
    )
    top.bar(np.arange(p), share, color="#4c72b0", width=0.85)
    top.set_ylabel("pool\nshare %", fontsize=8)
    top.tick_params(labelsize=7)
    top.grid(True, axis="y", alpha=0.3)
    top.set_title(title or f"Prompt usage on the validation split (entropy {usage_entropy(usage):.2f})", fontsize=10)
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0, vmax=max(frac.max(), 1e-9), interpolation="nearest")
    ax.set_xlabel("group prompt")
    ax.set_xticks(np.arange(p) if p <= 40 else np.linspace(0, p - 1, 10).astype(int))
    ax.set_ylabel("class (most train images first)")
    if c <= 40:
        names = class_names or [str(i) for i in range(c)]
        ax.set_yticks(np.arange(c), [f"{names[i]} ({class_counts[i]})" for i in order], fontsize=7)
    else:
        ax.set_yticks([])
    group = class_groups(class_counts, split)[order]
    for g in range(3):
        where = np.flatnonzero(group == g)
        if where.size:
            if where[0] > 0:
                ax.axhline(where[0] - 0.5, color="white", lw=1.5)
            ax.text(
                p - 0.4,
                (where[0] + where[-1]) / 2,
                f" {GROUPS[g]}",
                va="center",
                ha="left",
                fontsize=9,
                color=GROUP_COLORS[GROUPS[g]],
                clip_on=False,
            )
    cbar = fig.colorbar(im, ax=[top, ax], fraction=0.04, pad=0.8 / width)  # room for the group names
    cbar.set_label("share of the class's selections", fontsize=8)
    return save_figure(fig, path)


def plot_shot_confusion(matrix, path: Path, title: str = "") -> Path:
    """3x3 heatmap: images of many/medium/few classes (rows) predicted as many/medium/few classes."""
    plt = pyplot()
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
    return save_figure(fig, path)


def write_trial_figures(
    diag: Diagnostics,
    out: Path,
    phase1: dict | None = None,
    class_names: Sequence[str] | None = None,
    label: str = "",
) -> list[Path]:
    """The trial's PNGs and ``val_diagnostics.json`` in ``out`` from ``diagnostics``' output."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts, split = diag.class_counts, diag.shot_split
    shot = diag.shot()
    suffix = f" ({label})" if label else ""
    files = [
        plot_per_class(
            diag.per_class,
            counts,
            out / "per_class_accuracy.png",
            shot,
            f"Per-class validation accuracy against class frequency{suffix}",
            split,
        ),
        plot_shot_bars(shot, phase1, out / "shot_accuracy.png"),
        plot_shot_confusion(
            diag.shot_confusion,
            out / "shot_confusion.png",
            f"Head-vs-tail confusion on the validation split{suffix}",
        ),
    ]
    if diag.prompt_usage is not None:
        files.append(
            plot_prompt_usage(
                diag.prompt_usage,
                counts,
                out / "prompt_usage.png",
                class_names,
                f"Prompt usage on the validation split{suffix}, entropy {diag.prompt_usage_entropy:.2f}",
                split,
            )
        )
    numbers = diag.numbers()
    if diag.prompt_usage is not None:
        numbers.update(prompt_usage_per_prompt=np.asarray(diag.prompt_usage).sum(axis=0).tolist())
    numbers.update(phase1=phase1, groups=list(GROUPS))
    path = out / "val_diagnostics.json"
    plain = _plain(numbers)  # one key a line, each value compact (the usage matrix has C x P numbers)
    path.write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in plain.items()) + "\n}\n")
    return [*files, path]
