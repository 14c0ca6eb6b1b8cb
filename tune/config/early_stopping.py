"""When early stopping (ASHA) may judge a trial: its grace period in epochs, the rungs, and the rule
that stops a trial at a rung.

A study's ``early_stopping.grace_period`` is a number of phase-2 epochs, a fraction of them
(``0.1``), or ``auto``. The warm-up that counts is the largest the search space can sample (a study
that searches ``warmup_epochs`` up to 20 gets no rung inside 20), and the first rung comes after at
least ``peak_epochs`` (2) epochs at the peak learning rate: a rung inside the warm-up, or right
after it, compares trials before their learning rate has peaked (with the released per-epoch
warm-up, epoch 1 trains at ``warmup_lr`` 1e-6 throughout) and while the instance-balanced branch
still weighs about 0.5, which favours high learning rates and configs that disturb nothing; such a
grace period is refused. ``auto`` is the latest of a tenth of the schedule, that, and, when the
study searches ``lr``, half the schedule: before the cosine has halved the learning rate a rung
ranks learning rates by how fast they climb, not where they end (a given grace period earlier than
that runs, with a note in the dry run).

At a rung a trial is stopped only when the rung holds the results of at least ``min_trials`` (3)
other trials and the trial trails their cutoff (Ray's: the top 1/reduction_factor's threshold) by
at least ``margin_se`` (1) binomial standard errors of the validation accuracy
(``tune.engine.searcher.SteadyASHA``): one noisy reading against one other trial stops nothing.
ASHA ranks trials on one objective, so a study with several objectives runs every trial to the end
(``tune.config.study`` refuses early stopping there).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lpt_core.config import PhaseConfig
from tune.errors import ConfigError

if TYPE_CHECKING:
    from tune.config.space import SpaceBase
    from tune.config.study import EarlyStopping

AUTO_FRACTION = 0.1  # auto: the first rung at least a tenth of the schedule (9 of 90 epochs)
LR_FRACTION = 0.5  # auto with lr searched: not before the cosine has halved the lr (45 of 90 epochs)


def largest_warmup(space: SpaceBase | None, phase2: PhaseConfig) -> PhaseConfig:
    """``phase2`` with the longest warm-up a trial of ``space`` can run: the largest
    ``warmup_epochs`` it can sample below the schedule's length (the trainer runs none when the
    schedule is not longer than the warm-up), else the profile's."""
    spec = space.spec("warmup_epochs") if space is not None else None
    if spec is None:
        return phase2
    values = spec.values if spec.type == "choice" else range(int(spec.low), int(spec.high) + 1)
    below = [int(v) for v in values if int(v) < phase2.epochs]
    return phase2.model_copy(update={"warmup_epochs": max(below, default=0)})


def earliest_rung(
    early_stopping: EarlyStopping, phase2: PhaseConfig, space: SpaceBase | None = None
) -> tuple[int, int]:
    """The warm-up's end with the largest warm-up ``space`` samples (``warmup_end``), and the
    first epoch count with ``peak_epochs`` epochs at the peak learning rate after the warm-up's
    epochs (per epoch, epoch w + 1 is the first at the peak; per step, epoch w ends at it)."""
    longest = largest_warmup(space, phase2)
    w = longest.warmup_epochs if longest.epochs > longest.warmup_epochs else 0
    return warmup_end(longest), w + early_stopping.peak_epochs


def lr_rung(phase2: PhaseConfig, space: SpaceBase | None) -> int | None:
    """With ``lr`` searched, the first epoch at which the cosine has halved it; None otherwise."""
    return math.ceil(LR_FRACTION * phase2.epochs - 1e-9) if space is not None and "lr" in space else None


def warmup_end(phase2: PhaseConfig) -> int:
    """The first epoch count (1-based, completed epochs) at which a trial has left the warm-up:
    with the per-step warm-up the ramp ends with epoch ``warmup_epochs``; with the released
    per-epoch schedule epochs 1..``warmup_epochs`` train at warm-up values, so the first epoch
    at the peak rate ends at ``warmup_epochs + 1``. No warm-up (as the trainer: none when the
    schedule is not longer than it) gives 1."""
    w = phase2.warmup_epochs if phase2.epochs > phase2.warmup_epochs else 0
    if w == 0:
        return 1
    return w + 1 if phase2.warmup == "epoch" else w


def grace_epochs(
    early_stopping: EarlyStopping, phase2: PhaseConfig, where: str = "", space: SpaceBase | None = None
) -> int | None:
    """The study's grace period in epochs of this profile's phase 2 (``space``: the study's search
    space, for a searched ``warmup_epochs`` or ``lr``); None when early stopping is off or
    (``auto``) there is no epoch to compare at. A given grace period inside the warm-up, with fewer
    than ``peak_epochs`` epochs after it, or beyond the schedule is a ConfigError naming ``where``."""
    if not early_stopping.enabled:
        return None
    given, epochs = early_stopping.grace_period, phase2.epochs
    end, earliest = earliest_rung(early_stopping, phase2, space)
    at = f"{where}: early_stopping.grace_period"
    if given == "auto":
        grace = max(math.ceil(AUTO_FRACTION * epochs - 1e-9), earliest, lr_rung(phase2, space) or 1)
        return grace if grace <= epochs else None
    grace = given if isinstance(given, int) else max(1, math.ceil(given * epochs - 1e-9))
    shown = f"{given}" if isinstance(given, int) else f"{given} of {epochs} epochs = {grace}"
    if grace > epochs:
        raise ConfigError(
            f"{at}: {shown} is beyond phase 2's {epochs} epochs: ASHA would judge no trial "
            f"(use auto, a fraction such as 0.1, or enabled: false)"
        )
    if grace < earliest:
        longest = largest_warmup(space, phase2)
        schedule = "per epoch, as released: epochs 1.." if phase2.warmup == "epoch" else "per step over epochs 1.."
        w = longest.warmup_epochs
        sampled = " (the longest warmup_epochs the search space samples)" if longest is not phase2 else ""
        peak = early_stopping.peak_epochs
        where_in = "inside phase 2's warm-up" if grace < end else f"fewer than {peak} epochs after phase 2's warm-up"
        raise ConfigError(
            f"{at}: {shown} is {where_in} ({w} warm-up epoch{'s' * (w != 1)}{sampled}, "
            f"{schedule}{w} from lr {phase2.warmup_lr:g}): ASHA would compare "
            f"trials before their learning rate has run at its peak; use auto or at least {earliest}"
        )
    return grace


def asha_rungs(grace: int, reduction_factor: float, max_t: int) -> list[float]:
    """The epochs at which ASHA compares trials, below the last epoch (where every trial ends
    anyway): Ray's ``_Bracket`` milestones ``grace * rf**k`` for its ``MAX_RUNGS`` (ints where whole)."""
    count = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
    milestones = sorted(grace * reduction_factor**k for k in range(count))
    return [int(m) if float(m).is_integer() else m for m in milestones if m < max_t]


def describe(
    early_stopping: EarlyStopping,
    phase2: PhaseConfig,
    metric: str,
    objectives: int,
    space: SpaceBase | None = None,
    val_images=None,
) -> str:
    """The dry run's line: the rungs, why the first one is where it is, and the rule that stops a
    trial there (``val_images``: the validation split's size, for the SE; None when unknown)."""
    if objectives > 1:
        return (
            f"early stopping: off: a study with {objectives} objectives runs every trial its "
            f"{phase2.epochs} epochs (ASHA ranks trials on one objective; a trial it stopped would miss the "
            f"Pareto front)"
        )
    if not early_stopping.enabled:
        return f"early stopping: off (enabled: false): every trial runs its {phase2.epochs} epochs"
    grace = grace_epochs(early_stopping, phase2, space=space)
    if grace is None:
        return (
            f"early stopping: off: phase 2's {phase2.epochs} epochs leave no epoch after the warm-up "
            f"and {early_stopping.peak_epochs} epochs at the peak learning rate to compare "
            f"trials at"
        )
    rf = early_stopping.reduction_factor
    rungs = asha_rungs(grace, rf, phase2.epochs)
    if not rungs:
        return f"early stopping: none: the grace period {grace} is phase 2's last epoch"
    given, epochs = early_stopping.grace_period, phase2.epochs
    end, earliest = earliest_rung(early_stopping, phase2, space)
    peak = early_stopping.peak_epochs
    longest = largest_warmup(space, phase2).warmup_epochs
    why = [
        f"a tenth of the schedule {math.ceil(AUTO_FRACTION * epochs - 1e-9)}",
        f"{peak} epochs at the peak lr after the warm-up ({longest} epoch{'s' * (longest != 1)}"
        + (", the longest the space samples" if space is not None and "warmup_epochs" in space else "")
        + f") {earliest}",
    ]
    half = lr_rung(phase2, space)
    if half is not None:
        why.append(f"lr is searched, so not before the cosine halves it {half}")
    how = f"grace {given}: the latest of " + "; ".join(why) if given == "auto" else f"grace {given}"
    n, k = early_stopping.min_trials, early_stopping.margin_se
    se = f" (±{50.0 / math.sqrt(val_images):.1f} points at 50% on {val_images:,} images)" if val_images else ""
    line = (
        f"early stopping: ASHA on {metric} at epoch{'s' * (len(rungs) > 1)} {', '.join(map(str, rungs))} of "
        f"{epochs} (reduction {rf:g}, {how}); a trial is stopped at a rung only when the rung holds at least "
        f"{n} other trials' results and it trails their cutoff by at least {k:g} SE of {metric}{se}"
    )
    if half is not None and rungs[0] < half:
        line += (
            f"; warning: lr is searched and the first rung ({rungs[0]}) comes before the cosine halves the lr "
            f"(epoch {half}): ASHA may rank learning rates by how fast they climb (use grace_period: auto)"
        )
    return line
