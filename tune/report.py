"""Rebuild the report of a finished search: ``python tune/report.py --study NAME [--run-id ID]``.

Reads the search's parent MLflow run (the latest ``lpt.role=study`` run of the experiment NAME, or
``--run-id``), its trial runs and the search folder's ``trials.parquet`` (the parent's tag
``lpt.storage``, or ``--storage``); trains nothing. Writes Optuna's figures, ``trials.csv`` and
``summary.html`` to ``--out`` (default: ``<search folder>/report``) and logs them to the parent run
under ``report/``. ``--register [NAME]`` also registers the best trial's model (tune/serving/registry.py).
MLflow: MLFLOW_TRACKING_URI, or ./mlflow.db as for ``tune/search.py``.
Exit 0 on success, 2 with one line on stderr for bad input, 1 for a failure while building.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a script from anywhere: the repository root instead of tune/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from tune._cli import EXIT_BAD_INPUT, EXIT_FAILED, fail  # noqa: E402


class BadInput(ValueError):
    """The one line the CLI prints for bad input."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune/report.py", description=__doc__.splitlines()[0])
    p.add_argument("--study", required=True, help="the study's name (its MLflow experiment), or its .yaml path")
    p.add_argument("--run-id", help="the search's parent run (default: the latest search of the study)")
    p.add_argument(
        "--storage",
        help="the search folder, or the storage root holding it (default: the parent run's lpt.storage tag)",
    )
    p.add_argument("--out", help="output folder (default: <search folder>/report)")
    p.add_argument(
        "--register",
        nargs="?",
        const="",
        metavar="NAME",
        help="also log the best trial as an MLflow model and register it as NAME (default: <study>-<profile>)",
    )
    return p.parse_args(argv)


def find_parent(client, study: str, run_id: str | None):
    """The parent run of the search to report on."""
    from mlflow.exceptions import MlflowException

    from tune import names
    from tune import tracking as mt

    exp = client.get_experiment_by_name(study)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        raise BadInput(
            f"--study {study}: no MLflow experiment of that name (known: {', '.join(known) if known else 'none'})"
        )
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise BadInput(f"--run-id {run_id}: no such MLflow run") from None
        if run.info.experiment_id != exp.experiment_id:
            raise BadInput(f"--run-id {run_id}: the run is not in experiment '{study}'")
        if run.data.tags.get(names.ROLE) != names.ROLE_STUDY:
            raise BadInput(
                f"--run-id {run_id}: not a search's parent run "
                f"(lpt.role={run.data.tags.get(names.ROLE, 'unset')}; the parent has lpt.role=study)"
            )
        return run
    run = mt.latest_run(client, exp.experiment_id, **{names.ROLE: names.ROLE_STUDY})
    if run is None:
        raise BadInput(f"--study {study}: experiment has no search (no run with lpt.role=study)")
    return run


def search_folder(run, storage: str | None):
    """The search's folder (a ``tune.storage.Location``): ``--storage`` (the folder, or the storage
    root holding it), else the parent run's ``lpt.storage`` tag, local or object storage."""
    from tune import names
    from tune.storage import StorageError, location

    tags = run.data.tags
    try:
        if storage:
            root = location(storage)
            folder = root if (root / names.TABLE_FILE).is_file() else root / tags.get(names.SEARCH, "")
            where = f"--storage {storage}"
        else:
            if not tags.get(names.STORAGE):
                raise BadInput(f"run {run.info.run_id}: no lpt.storage tag; give the search folder with --storage")
            folder = location(tags[names.STORAGE])
            where = f"run {run.info.run_id} (tag lpt.storage)"
        found = (folder / names.TABLE_FILE).is_file()
    except (StorageError, OSError) as exc:
        raise BadInput(f"{storage or tags.get(names.STORAGE)}: cannot read the search's storage ({exc})") from None
    if not found:
        raise BadInput(
            f"{folder / names.TABLE_FILE}: missing; {where} does not hold the search's table"
            + ("" if storage else " (give the search folder with --storage)")
        )
    return folder


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mlflow import MlflowClient

    from tune import errors, names
    from tune import tracking as mt
    from tune.errors import error_line
    from tune.reports.search import search_report

    study = Path(args.study).stem if args.study.endswith((".yaml", ".yml")) else args.study
    try:
        uri = mt.existing_store_uri()
    except errors.ServiceError as exc:
        return fail(exc, EXIT_BAD_INPUT if isinstance(exc, mt.MissingStore) else EXIT_FAILED)
    client = MlflowClient(uri)
    try:
        if args.register:
            from tune.config.checks import check_model_name
            from tune.errors import ConfigError

            try:
                check_model_name(args.register)
            except ConfigError as exc:
                raise BadInput(str(exc)) from None
        run = find_parent(client, study, args.run_id)
        folder = search_folder(run, args.storage)
    except BadInput as exc:
        return fail(exc, EXIT_BAD_INPUT)
    out = Path(args.out).expanduser().resolve() if args.out else folder / names.REPORT_DIR  # local, or the storage
    try:
        built = search_report(client, run.info.run_id, out, folder)
    except Exception as exc:
        return fail(f"the report failed: {error_line(exc)}", EXIT_FAILED)
    print(
        f"search {run.data.tags.get(names.SEARCH, run.info.run_name)} (parent run {run.info.run_id}): "
        f"{len(built['files'])} files in {out}, logged to the parent run under report/"
    )
    for path in built["files"]:
        print(f"  {path.name}")
    for name, why in built["skipped"].items():
        print(f"  ({name}: not drawn, {why})")
    if args.register is not None:
        from tune.serving.registry import register_and_print

        return register_and_print(client, uri, run, folder, args.register)
    return 0


if __name__ == "__main__":
    sys.exit(main())
