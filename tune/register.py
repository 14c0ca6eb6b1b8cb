"""Register a finished search's best trial as an MLflow model: ``python tune/register.py --study NAME``.

What ``tune/report.py --register`` does, without rebuilding the report (so it needs no write access
to the search folder): the search's parent run (the latest ``lpt.role=study`` run of the
experiment NAME, or ``--run-id``), its folder (the parent's ``lpt.storage`` tag, or ``--storage``),
its best trial's prompts, logged as the LPT model in the experiment ``lpt-models`` and registered as
``--name`` (default ``<study>-<profile>``; tune/serving/registry.py). On the compose stack this is
the one-shot service ``register`` (``docker compose run --rm register --study NAME``), the only one
that logs in as the MLflow user ``registrar``: ``LPT_MLFLOW_LOGIN`` names its credentials file
(``[mlflow]`` mlflow_tracking_username / mlflow_tracking_password, as ``~/.mlflow/credentials``).
Exit 0 registered, 2 with one line on stderr for bad input, 1 for a failure while registering.
"""

from __future__ import annotations

import argparse
import configparser
import os
import sys
from pathlib import Path

if not __package__:  # run as a script from anywhere: the repository root instead of tune/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tune._cli import EXIT_BAD_INPUT, EXIT_FAILED, fail  # noqa: E402

LOGIN = "LPT_MLFLOW_LOGIN"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune/register.py", description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, help="the study's name (its MLflow experiment), or its .yaml path")
    p.add_argument("--run-id", help="the search's parent run (default: the latest search of the study)")
    p.add_argument("--storage", help="the search folder, or the storage root holding it (default: lpt.storage)")
    p.add_argument("--name", default="", help="the registered model's name (default: <study>-<profile>)")
    return p.parse_args(argv)


def use_login(path: str) -> None:
    """This process's MLflow clients log in with the credentials file ``path``."""
    config = configparser.ConfigParser()
    try:
        config.read_string(Path(path).read_text())
        section = config["mlflow"]
        login = section["mlflow_tracking_username"], section["mlflow_tracking_password"]
    except (OSError, KeyError, configparser.Error) as exc:
        raise ValueError(f"{LOGIN}={path}: not a readable MLflow credentials file ({type(exc).__name__})") from None
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = login


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mlflow import MlflowClient

    from tune import errors
    from tune import tracking as mt
    from tune.config.checks import check_model_name
    from tune.report import BadInput, find_parent, search_folder
    from tune.serving.registry import register_and_print

    study = Path(args.study).stem if args.study.endswith((".yaml", ".yml")) else args.study
    try:
        if os.environ.get(LOGIN):
            use_login(os.environ[LOGIN])
        if args.name:
            check_model_name(args.name, "--name")
        uri = mt.existing_store_uri()
    except (ValueError, mt.MissingStore) as exc:
        return fail(exc, EXIT_BAD_INPUT)
    except errors.ServiceError as exc:
        return fail(exc, EXIT_FAILED)
    client = MlflowClient(uri)
    try:
        run = find_parent(client, study, args.run_id)
        folder = search_folder(run, args.storage)
    except BadInput as exc:
        return fail(exc, EXIT_BAD_INPUT)
    return register_and_print(client, uri, run, folder, args.name or None)


if __name__ == "__main__":
    sys.exit(main())
