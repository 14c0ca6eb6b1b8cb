"""When early stopping (ASHA) may judge a trial: its grace period in epochs, and the rungs.

A study's ``early_stopping.grace_period`` is a number of phase-2 epochs, a fraction of them
(``0.1``), or ``auto``: at least a tenth of the schedule and never inside the warm-up. A rung
inside the warm-up compares trials before their learning rate has reached its peak (with the
released per-epoch warm-up, epoch 1 trains at ``warmup_lr`` 1e-6 throughout) and while the
instance-balanced branch still weighs about 0.5, which favours high learning rates and configs
that disturb nothing; such a grace period is refused. ASHA ranks trials on one objective, so a
study with several objectives runs every trial to the end (``tune.config.study`` refuses early
stopping there): a trial it stopped would be off the Pareto front only because its first
objective started slower.
"""

from __future__ import annotations

import math

from lpt_core.config import PhaseConfig
from tune.errors import ConfigError

AUTO_FRACTION = 0.1  # auto: the first rung at least a tenth of the schedule (9 of 90 epochs)


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


def grace_epochs(early_stopping: dict, phase2: PhaseConfig, where: str = "") -> int | None:
    """The study's grace period in epochs of this profile's phase 2; None when early stopping is
    off or (``auto``) there is no epoch after the warm-up to compare at. A given grace period
    inside the warm-up or beyond the schedule is a ConfigError naming ``where``."""
    if not early_stopping["enabled"]:
        return None
    given, epochs, earliest = early_stopping["grace_period"], phase2.epochs, warmup_end(phase2)
    at = f"{where}: early_stopping.grace_period"
    if given == "auto":
        grace = max(math.ceil(AUTO_FRACTION * epochs - 1e-9), earliest)
        return grace if grace <= epochs else None
    grace = given if isinstance(given, int) else max(1, math.ceil(given * epochs - 1e-9))
    shown = f"{given}" if isinstance(given, int) else f"{given} of {epochs} epochs = {grace}"
    if grace > epochs:
        raise ConfigError(
            f"{at}: {shown} is beyond phase 2's {epochs} epochs: ASHA would judge no trial "
            f"(use auto, a fraction such as 0.1, or enabled: false)"
        )
    if grace < earliest:
        schedule = "per epoch, as released: epochs 1.." if phase2.warmup == "epoch" else "per step over epochs 1.."
        w = phase2.warmup_epochs
        raise ConfigError(
            f"{at}: {shown} is inside phase 2's warm-up ({w} warm-up epoch{'s' * (w != 1)}, "
            f"{schedule}{w} from lr {phase2.warmup_lr:g}): ASHA would compare "
            f"trials before their learning rate peaks; use auto or at least {earliest}"
        )
    return grace


def asha_rungs(grace: int, reduction_factor: float, max_t: int) -> list[int]:
    """The epochs at which ASHA compares trials, below the last epoch (where every trial ends
    anyway): Ray's ``_Bracket`` milestones ``grace * rf**k`` for its ``MAX_RUNGS``."""
    count = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
    milestones = sorted(grace * reduction_factor**k for k in range(count))
    return [int(m) if float(m).is_integer() else m for m in milestones if m < max_t]


def describe(early_stopping: dict, phase2: PhaseConfig, metric: str, objectives: int) -> str:
    """The dry run's line, e.g. ``early stopping: ASHA on val_acc at epochs 9, 18, 36, 72
    (reduction 2) of 90``."""
    if objectives > 1:
        return (
            f"early stopping: off: a study with {objectives} objectives runs every trial its "
            f"{phase2.epochs} epochs (ASHA ranks trials on one objective; a trial it stopped would miss the "
            f"Pareto front)"
        )
    if not early_stopping["enabled"]:
        return f"early stopping: off (enabled: false): every trial runs its {phase2.epochs} epochs"
    grace = grace_epochs(early_stopping, phase2)
    if grace is None:
        return (
            f"early stopping: off: phase 2's {phase2.epochs} epochs leave no epoch after the warm-up "
            f"to compare trials at"
        )
    rungs = asha_rungs(grace, early_stopping["reduction_factor"], phase2.epochs)
    if not rungs:
        return f"early stopping: none: the grace period {grace} is phase 2's last epoch"
    given = early_stopping["grace_period"]
    how = "" if isinstance(given, int) else f", grace {given}"
    return (
        f"early stopping: ASHA on {metric} at epochs {', '.join(map(str, rungs))} of {phase2.epochs} "
        f"(reduction {early_stopping['reduction_factor']:g}{how})"
    )
