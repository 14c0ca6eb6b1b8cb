"""Run an LPT hyperparameter study: ``python tune/search.py --study prompt_pool [--profile smoke]``.

Checks the study and profile, then runs a Ray Tune search (Optuna TPE proposes, ASHA stops bad
trials early) on the local machine or on the cluster named by RAY_ADDRESS; every trial lands in
MLflow (MLFLOW_TRACKING_URI, or ./mlflow.db) and in ``trials.parquet``. Exit 0 on success, 2 with
one line on stderr for bad input, 1 for a failure while running.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

if not __package__:  # run as a script from anywhere: the repository root instead of tune/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tune._cli import EXIT_BAD_INPUT, EXIT_FAILED, fail  # noqa: E402
from tune.config.plan import Plan
from tune.errors import ConfigError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune/search.py", description=__doc__.splitlines()[0])
    p.add_argument("--study", help="a file in studies/ (name or .yaml path); required unless --schema")
    p.add_argument("--profile", default="smoke", help="a file in studies/profiles/ or a .yaml path (default: smoke)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile value, e.g. --set phase2.epochs=3, or a study's budget.* value (repeatable)",
    )
    p.add_argument("--trials", type=int, help="trial budget (default: the study's)")
    hours = p.add_mutually_exclusive_group()
    hours.add_argument(
        "--gpu-hours",
        type=float,
        metavar="H",
        help="GPU-hours the search may spend (study key budget.gpu_hours): no trial starts past them",
    )
    hours.add_argument(
        "--cpu-hours",
        type=float,
        metavar="H",
        help="the same in CPU-core-hours (budget.cpu_hours), for CPU-only trials",
    )
    p.add_argument("--storage", help="search folder root, shared by all nodes (default: ./runs or $LPT_STORAGE)")
    p.add_argument(
        "--resume", action="store_true", help="continue the latest interrupted search of this study and profile"
    )
    p.add_argument(
        "--confirm",
        type=int,
        default=0,
        metavar="N",
        help="retrain the best config with N fresh seeds and report test accuracy mean and std",
    )
    p.add_argument("--dry-run", action="store_true", help="check and describe the search, train nothing")
    p.add_argument(
        "--register",
        nargs="?",
        const="",
        metavar="NAME",
        help="log the best trial as an MLflow model and register it as NAME (default: <study>-<profile>)",
    )
    p.add_argument(
        "--schema", choices=("study", "profile"), help="print the JSON Schema of a study or a profile file and exit"
    )
    args = p.parse_args(argv)
    if not args.schema and not args.study:
        p.error("the following arguments are required: --study")
    return args


def check_ray_address() -> str | None:
    """RAY_ADDRESS, checked to answer before anything starts; None means a local Ray."""
    from tune.errors import ServiceError

    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address or address in ("local", "auto"):
        return address or None
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or hostport, int(port or 6379)), timeout=5):
            pass
    except (OSError, ValueError) as exc:
        raise ServiceError(f"RAY_ADDRESS={address}: cannot reach the Ray cluster ({exc})") from None
    return address


# set where registration runs under another identity (the compose driver: "docker compose run --rm register")
REGISTER_WITH = "LPT_REGISTER_WITH"


def run(args: argparse.Namespace) -> int:
    if args.schema:
        from tune.config.study import schema

        print(json.dumps(schema(args.schema), indent=2))
        return 0
    if args.register is not None and os.environ.get(REGISTER_WITH):  # the compose driver: searcher's login only
        raise ConfigError(
            f"--register: this driver's MLflow login may not register models on this stack; "
            f"after the search run: {os.environ[REGISTER_WITH]} --study {Path(args.study or 'STUDY').stem}"
        )
    from tune.tracking_retry import apply_retry_settings, describe, retry_settings

    apply_retry_settings()  # before any MLflow call: the project's retry window unless the environment sets one
    plan = Plan(args)
    if args.dry_run:
        print(plan.describe())
        print(describe(retry_settings()))
        from tune.config.disk_space import free_space_lines

        print("\n".join(free_space_lines(plan.storage)))
        return 0
    from tune.tracking import check_tracking_uri, resolve_tracking_uri  # imports MLflow: not before here

    uri = resolve_tracking_uri()
    check_tracking_uri(uri)
    address = check_ray_address()
    if address:
        from tune.engine.cluster_checks import check_cluster_tracking  # imports Ray: not for a dry run

        check_cluster_tracking(uri)
    from tune.engine.run import run_search

    return run_search(plan, args, uri, address)


def main(argv: list[str] | None = None) -> int:
    """Exit 2 with one line for bad input, 1 with one line for a service or download that fails."""
    args = parse_args(argv)
    from lpt_core.data import DownloadError
    from tune.errors import ServiceError

    try:
        return run(args)
    except ConfigError as exc:
        return fail(exc, EXIT_BAD_INPUT)
    except (ServiceError, DownloadError) as exc:
        return fail(exc, EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
