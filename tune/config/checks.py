"""Checks of the environment a search runs in, made before anything starts: the Optuna storage URL,
the system-metrics interval and a registered model's name."""

from __future__ import annotations

import os
import re

from tune.errors import ConfigError

OPTUNA_STORAGE_ENV = "LPT_OPTUNA_STORAGE"  # the searches' Optuna storage (a database URL)
SYSTEM_METRICS_ENV = "LPT_SYSTEM_METRICS_S"  # seconds between a trial's system-metric samples (0: off)
DEFAULT_SYSTEM_METRICS_S = 10.0


def system_metrics_interval() -> float:
    """Seconds between a trial run's system-metric samples: ``LPT_SYSTEM_METRICS_S``, else 10;
    0 turns them off."""
    raw = os.environ.get(SYSTEM_METRICS_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_SYSTEM_METRICS_S
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{SYSTEM_METRICS_ENV}={raw}: expected seconds between samples (e.g. 10; 0: off)")
    return value


def check_storage_env() -> None:
    """``LPT_OPTUNA_STORAGE``, checked before anything starts: a database URL without a password
    (the URL is recorded in MLflow, tag ``lpt.optuna_storage``); ``LPT_SYSTEM_METRICS_S`` too."""
    system_metrics_interval()
    url = os.environ.get(OPTUNA_STORAGE_ENV, "").strip()
    if not url:
        return
    import sqlalchemy

    try:
        password = sqlalchemy.engine.make_url(url).password
    except Exception:
        raise ConfigError(
            f"{OPTUNA_STORAGE_ENV}={url}: not a database URL (e.g. postgresql+psycopg2://user@host:5432/db)"
        ) from None
    if password is not None:
        raise ConfigError(
            f"{OPTUNA_STORAGE_ENV}: the URL holds a password, and the URL is recorded in MLflow "
            f"(tag lpt.optuna_storage); give the password through PGPASSFILE instead"
        )


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,255}")


def check_model_name(name: str, where: str = "--register") -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{where} {name!r}: a registered model name is letters, digits, '.', '_' and '-' "
            f"(it goes into models:/NAME/VERSION)"
        )
    return name
