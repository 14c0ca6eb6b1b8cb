"""Checks of the environment a search runs in, made before anything starts: the Optuna storage URL and
a registered model's name."""

from __future__ import annotations

import os
import re

from tune.errors import ConfigError

OPTUNA_STORAGE_ENV = "LPT_OPTUNA_STORAGE"  # the searches' Optuna storage (a database URL)


def check_storage_env() -> None:
    """``LPT_OPTUNA_STORAGE``, checked before anything starts: a database URL without a password
    (the URL is recorded in MLflow, tag ``lpt.optuna_storage``)."""
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
