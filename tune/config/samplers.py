"""The study's Optuna sampler, sized to its budget.

Optuna's TPE starts with ``n_startup_trials=10`` random trials: a 12-trial study would be a random
search. Unless the study says otherwise, the sampler here starts with a third of the budget (at
least 2, never more than Optuna's 10) and samples the parameters jointly (multivariate TPE, which
Optuna 5 already does for one objective but not for several), in groups where one parameter's
range depends on another (``top_k`` cut to each trial's ``pool_size``), with the constant liar
for concurrent trials (Optuna 5's default too).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import optuna

if TYPE_CHECKING:
    from tune.config.space import SpaceBase
    from tune.config.study import StudyConfig

MAX_STARTUP = 10  # Optuna's own default: never more random trials than that
NAMES = {"tpe": "TPE", "random": "random", "gp": "Gaussian process", "cmaes": "CMA-ES"}


def startup_trials(budget: int) -> int:
    """Random trials before the model: about a third of the budget, at least 2, at most 10."""
    return max(2, min(MAX_STARTUP, budget // 3))


def conditional(space: SpaceBase) -> bool:
    """Whether a parameter's range depends on another's value in this space: ``top_k``'s range is
    cut to each trial's ``pool_size`` when it can exceed the smallest pool."""
    pool, top_k = space.spec("pool_size"), space.spec("top_k")
    if not pool or not top_k or top_k.type == "choice":
        return False
    return top_k.high > (min(pool.values) if pool.type == "choice" else pool.low)


def sampler_settings(study: StudyConfig, budget: int) -> dict:
    """The study's ``sampler`` section with every unset key resolved for ``budget`` trials (a dict:
    the keyword arguments of the Optuna sampler, ``make_sampler``)."""
    spec = study.sampler
    out: dict = {"type": spec.type, "seed": study.seed}
    if spec.type != "random":
        n = spec.n_startup_trials
        out["n_startup_trials"] = startup_trials(budget) if n is None else n
    if spec.type == "tpe":
        multivariate = True if spec.multivariate is None else spec.multivariate
        out["multivariate"] = multivariate
        out["group"] = (conditional(study.space) and multivariate) if spec.group is None else spec.group
        out["constant_liar"] = True if spec.constant_liar is None else spec.constant_liar
    return out


def make_sampler(settings: dict, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of ``sampler_settings``; ``seed_offset`` gives an extension of a search
    draws of its own."""
    kw = {k: v for k, v in settings.items() if k not in ("type", "seed")}
    seed = settings["seed"] + seed_offset
    with warnings.catch_warnings():  # group and the GP sampler are "experimental" in Optuna's sense
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if settings["type"] == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **kw)
        if settings["type"] == "gp":
            return optuna.samplers.GPSampler(seed=seed, **kw)
        if settings["type"] == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, **kw)
    return optuna.samplers.RandomSampler(seed=seed)


def describe_sampler(settings: dict, budget: int) -> str:
    """One line: ``TPE (multivariate, constant liar), 4 random start-up trials of 12, seed 0``."""
    flags = [k.replace("_", " ") for k in ("multivariate", "group", "constant_liar") if settings.get(k)]
    text = NAMES[settings["type"]] + (f" ({', '.join(flags)})" if flags else "")
    if "n_startup_trials" in settings:
        text += f", {settings['n_startup_trials']} random start-up trials of {budget}"
    return f"{text}, seed {settings['seed']}"
