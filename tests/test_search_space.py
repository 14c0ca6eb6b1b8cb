"""The Optuna space keeps LPT's constraints: top_k <= pool_size, 1 <= group_start <= depth - 1."""

import optuna
import pytest

from lpt_core.config import LPTConfig
from tune.config.search_space import DefineByRun, check_space, prompt_lengths
from tune.config.space import Space
from tune.errors import ConfigError

DEFAULTS = LPTConfig(prompt_length=10, pool_size=20, top_k=2, group_start=6)
SPACE = Space.model_validate(
    {
        "pool_size": {"type": "int", "low": 1, "high": 6},
        "top_k": {"type": "int", "low": 1, "high": 4},
        "group_start": {"type": "int", "low": 2, "high": 10},
        "margin": {"type": "float", "low": 0.0, "high": 0.5},
    }
)


def test_sampled_configs_respect_the_constraints():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    study.optimize(lambda t: (DefineByRun(SPACE, DEFAULTS, depth=4)(t), t.params["pool_size"])[1], n_trials=40)
    for trial in study.trials:
        p = trial.params
        assert 1 <= p["top_k"] <= min(4, p["pool_size"])
        assert 2 <= p["group_start"] <= 3
        assert 0.0 <= p["margin"] <= 0.5


def test_unsatisfiable_ranges_are_caught_before_the_search():
    with pytest.raises(ConfigError, match="space.group_start: no value in 1..3"):
        check_space(Space.model_validate({"group_start": {"type": "int", "low": 4, "high": 8}}), DEFAULTS, 4, "s.yaml")
    with pytest.raises(ConfigError, match="space.top_k: low 5 exceeds the smallest pool_size 4"):
        check_space(
            Space.model_validate(
                {"pool_size": {"type": "int", "low": 4, "high": 8}, "top_k": {"type": "int", "low": 5, "high": 6}}
            ),
            DEFAULTS,
            12,
            "s.yaml",
        )
    with pytest.raises(ConfigError, match="model.group_start: must be in 1..3"):
        check_space(Space.model_validate({"margin": {"type": "float", "low": 0.0, "high": 1.0}}), DEFAULTS, 4, "s.yaml")


def test_prompt_lengths_imply_the_phase1_trainings():
    space = Space.model_validate
    assert prompt_lengths(space({"margin": {"type": "float", "low": 0.0, "high": 1.0}}), 10) == [10]
    assert prompt_lengths(space({"prompt_length": {"type": "choice", "values": [20, 5, 5]}}), 10) == [5, 20]
    assert prompt_lengths(space({"prompt_length": {"type": "int", "low": 2, "high": 8, "step": 3}}), 10) == [2, 5, 8]
