"""The study's search space as an Optuna define-by-run function, with LPT's constraints.

``top_k`` never exceeds the sampled (or fixed) ``pool_size``, and ``group_start`` stays within
1..depth-1 of the profile's backbone: their integer ranges are narrowed per trial.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import optuna

from lpt_core.config import LPTConfig, PhaseConfig
from tune.errors import ConfigError

if TYPE_CHECKING:
    from tune.config.space import SpaceBase

# Sample pool_size before top_k so the constraint can narrow top_k's range.
ORDER = ("prompt_length", "pool_size", "top_k", "group_start")


def _ordered(space: SpaceBase) -> list[str]:
    return sorted(space.params(), key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def int_bounds(name: str, low: int, high: int, chosen: dict, depth: int) -> tuple[int, int]:
    if name == "top_k":
        high = min(high, chosen["pool_size"])  # a sampled config: a dict of values
    if name == "group_start":
        low, high = max(low, 1), min(high, depth - 1)
    return low, high


def check_space(space: SpaceBase, model_defaults: LPTConfig, depth: int, where: str) -> None:
    """Fail before Ray starts when a range cannot be satisfied for this backbone."""
    pool = space.spec("pool_size")
    min_pool = (min(pool.values) if pool.type == "choice" else pool.low) if pool else model_defaults.pool_size
    for name, spec in space.params().items():
        values = spec.values if spec.type == "choice" else [spec.low, spec.high]
        if name == "group_start" and (max(values) < 1 or min(values) > depth - 1):
            raise ConfigError(
                f"{where}: space.group_start: no value in 1..{depth - 1} (the backbone has {depth} blocks)"
            )
        if name == "group_start" and spec.type == "choice" and max(values) > depth - 1:
            raise ConfigError(f"{where}: space.group_start.values: {max(values)} is not below the depth {depth}")
        if name == "top_k" and min(values) > min_pool:
            raise ConfigError(f"{where}: space.top_k: low {min(values)} exceeds the smallest pool_size {min_pool}")
        if name == "top_k" and spec.type == "choice" and max(values) > min_pool:
            raise ConfigError(
                f"{where}: space.top_k.values: {max(values)} exceeds the smallest pool_size {min_pool}; use an int range"  # noqa: E501
            )
    if "top_k" not in space and model_defaults.top_k > min_pool:
        raise ConfigError(f"{where}: model.top_k: {model_defaults.top_k} exceeds the smallest pool_size {min_pool}")
    if "group_start" not in space and not 1 <= model_defaults.group_start <= depth - 1:
        raise ConfigError(f"{where}: model.group_start: must be in 1..{depth - 1} for this backbone")


class DefineByRun:
    """Optuna define-by-run space (a class, not a closure: Tune pickles its searcher)."""

    def __init__(self, space: SpaceBase, model_defaults: LPTConfig, depth: int):
        self.space, self.model_defaults, self.depth = space, model_defaults, depth

    def __call__(self, trial: optuna.Trial) -> None:
        chosen = self.model_defaults.model_dump()  # the trial's values so far, sampled over the defaults
        params = self.space.params()
        for name in _ordered(self.space):
            spec = params[name]
            if spec.type == "choice":
                chosen[name] = trial.suggest_categorical(name, spec.values)
            elif spec.type == "int":
                low, high = int_bounds(name, spec.low, spec.high, chosen, self.depth)
                chosen[name] = trial.suggest_int(name, low, high, step=spec.step or 1, log=spec.log)
            else:
                chosen[name] = trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)


def describe(space: SpaceBase, depth: int) -> list[str]:
    lines = []
    for name, spec in space.params().items():
        if spec.type == "choice":
            lines.append(f"{name}: one of {spec.values}")
            continue
        extra = (f" step {spec.step}" if spec.step is not None else "") + (" (log)" if spec.log else "")
        if name == "group_start":
            low, high = int_bounds(name, int(spec.low), int(spec.high), {}, depth)  # what the trials can sample
            if (low, high) != (spec.low, spec.high):
                extra += f" (here {low}..{high}: the backbone has {depth} blocks)"
        if name == "top_k":
            extra += " (at most pool_size)"
        lines.append(f"{name}: {spec.type} {spec.low}..{spec.high}{extra}")
    return lines


def prompt_lengths(space: SpaceBase, default: int) -> list[int]:
    """The prompt lengths the search can sample (each is one phase-1 training)."""
    spec = space.spec("prompt_length")
    if spec is None:
        return [default]
    if spec.type == "choice":
        return sorted(set(spec.values))
    return list(range(int(spec.low), int(spec.high) + 1, int(spec.step or 1)))


def baseline_config(space: SpaceBase, model_defaults: LPTConfig, recipe: PhaseConfig) -> dict:
    """The profile's own value of every searched parameter: the baseline trial's config (a dict:
    Optuna enqueues it as the trial's params)."""
    own = lambda name: getattr(model_defaults if name in LPTConfig.model_fields else recipe, name)
    return {name: own(name) for name in space.params()}


def check_baseline(space: SpaceBase, config: dict, where: str) -> list[str]:
    """A baseline value that a ``choice`` lacks cannot be a trial of the study (an error); one
    outside a range can (Optuna keeps it), and is returned as a note for the dry run."""
    notes = []
    params = space.params()
    for name, value in config.items():
        spec = params[name]
        if spec.type == "choice" and value not in spec.values:
            raise ConfigError(
                f"{where}: space.{name}.values: the baseline needs the profile's {name} {value!r} "
                f"among {spec.values}; add it, or set baseline.enabled: false"
            )
        if spec.type != "choice" and not spec.low <= value <= spec.high:
            notes.append(f"{name}={value:g} lies outside {spec.low:g}..{spec.high:g}")
    return notes


def check_prompt_lengths(space: SpaceBase, trials: int, where: str) -> None:
    """Every prompt length the space can sample is one phase 1, trained up front: an int range of
    more lengths than the budget has trials would train phase 1s that no trial uses."""
    spec = space.spec("prompt_length")
    if spec is None or spec.type != "int":
        return
    lengths = prompt_lengths(space, 0)
    if len(lengths) > trials:
        k = min(trials, 4)
        some = sorted({lengths[round(i * (len(lengths) - 1) / max(k - 1, 1))] for i in range(k)})
        raise ConfigError(
            f"{where}: space.prompt_length: an int range of {len(lengths)} lengths "
            f"({spec.low}..{spec.high}) means {len(lengths)} phase-1 trainings up front for "
            f"{trials} trials; use a choice of lengths, e.g. {{type: choice, values: {some}}}"
        )
