"""How long an MLflow client call retries before it gives up: the project's settings of MLflow's
``MLFLOW_HTTP_REQUEST_*`` variables, in one place for the driver and every trial.

``apply_retry_settings()`` puts the project's defaults into this process's environment where the
user's environment sets nothing (a value set there wins) and returns the four values, which the
driver passes to every Ray task (``tune.engine.tuner.start_ray``). ``retry_window`` is what they
mean: MLflow's session retries ``MAX_RETRIES`` times with urllib3's back-off, which sleeps nothing
before the first retry and ``BACKOFF_FACTOR * 2**(n-1)`` (plus up to ``BACKOFF_JITTER``, capped at
urllib3's 120 s) before retry n >= 2; each try waits up to ``TIMEOUT`` s for a server that hangs.
MLflow's own defaults (7, 2, 1.0, 120) give 244-249 s against a refused connection: about four
minutes, not the two its docs say. Plain module: no MLflow import (the CLI reads it first).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from tune.errors import ConfigError

MAX_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
BACKOFF_FACTOR = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
BACKOFF_JITTER = "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"
TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"

# the project's defaults: MLflow's retries and back-off (a 60 s MLflow restart is ridden out), and
# 60 s per try instead of 120 s, so that a hung server fails a call in 12 minutes, not 20
DEFAULTS: dict[str, int | float] = {MAX_RETRIES: 7, BACKOFF_FACTOR: 2, BACKOFF_JITTER: 1.0, TIMEOUT: 60}
# MLflow refuses more (mlflow/environment_variables.py: _MLFLOW_HTTP_REQUEST_*_LIMIT)
LIMITS: dict[str, int | float] = {MAX_RETRIES: 10, BACKOFF_FACTOR: 120, BACKOFF_JITTER: 120.0, TIMEOUT: 3600}
BACKOFF_MAX_S = 120.0  # urllib3's Retry.DEFAULT_BACKOFF_MAX


def retry_settings(environ: MutableMapping[str, str] | None = None) -> dict[str, int | float]:
    """The four values in effect: the environment's where set, else the project's defaults; a value
    MLflow would refuse is a ``ConfigError`` naming the variable."""
    environ = os.environ if environ is None else environ
    settings: dict[str, int | float] = {}
    for name, default in DEFAULTS.items():
        raw = environ.get(name, "").strip()
        if not raw:
            settings[name] = default
            continue
        kind = float if isinstance(default, float) else int  # MLflow parses these three as int
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw}: not a{'' if kind is float else 'n integer'} number") from None
        low = 1 if name == TIMEOUT else 0
        if not low <= value <= LIMITS[name]:
            raise ConfigError(f"{name}={raw}: must be between {low} and {LIMITS[name]:g}")
        settings[name] = value
    return settings


def apply_retry_settings(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the settings in ``environ`` (this process's environment by default) and return them as
    the environment variables a Ray task gets."""
    environ = os.environ if environ is None else environ
    env = {name: f"{v:g}" if isinstance(v, float) else str(v) for name, v in retry_settings(environ).items()}
    environ.update(env)
    return env


def retry_window(settings: dict[str, int | float]) -> tuple[float, float, float]:
    """(shortest, longest) seconds a call retries against a server that refuses connections, and the
    longest against one that accepts and never answers (every try waits ``TIMEOUT``)."""
    retries, factor, jitter = int(settings[MAX_RETRIES]), settings[BACKOFF_FACTOR], settings[BACKOFF_JITTER]
    sleeps = [factor * 2 ** (n - 1) for n in range(2, retries + 1)]
    low = sum(min(BACKOFF_MAX_S, s) for s in sleeps)
    high = sum(min(BACKOFF_MAX_S, s + jitter) for s in sleeps)
    return low, high, high + (retries + 1) * settings[TIMEOUT]


def describe(settings: dict[str, int | float]) -> str:
    """One line for ``--dry-run`` and the logs."""
    low, high, hung = retry_window(settings)
    return (
        f"MLflow client: {settings[MAX_RETRIES]} retries, back-off factor {settings[BACKOFF_FACTOR]} "
        f"(jitter {settings[BACKOFF_JITTER]:g} s), {settings[TIMEOUT]} s per try: a call gives up after "
        f"{low:.0f}-{high:.0f} s against a stopped server, {hung:.0f} s at most against a hung one"
    )
