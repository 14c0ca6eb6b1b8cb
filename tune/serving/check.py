"""The LPT model's artifact layout, checked before anything in it is loaded; ``python -m
tune.serving.check URI DIR`` downloads a model into DIR and checks it (what to serve).

An LPT model is data only: the MLmodel names the installed loader (``tune.serving.loader``) and
the model holds the prompt file and ``lpt_model.json`` under ``data/lpt/`` plus MLflow's metadata
files. Anyone who may write the model's artifacts could add a code file or point the MLmodel at
other code (an MLmodel ``code`` path is put first on ``sys.path``, a ``python_model`` is
unpickled), and MLflow would run it on load; so a model whose MLmodel or files differ from that
layout is refused with one line naming the file, before MLflow reads it. Exit 0 checked, 2 refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from tune.errors import ConfigError

LOADER = "tune.serving.loader"  # the installed module the MLmodel must name
DATA = "data/lpt"  # the logged data folder (the prompts and lpt_model.json), relative to the model
CONFIG_FILE, PROMPTS_FILE = "lpt_model.json", "prompts.safetensors"
DATA_FILES = {f"{DATA}/{CONFIG_FILE}", f"{DATA}/{PROMPTS_FILE}"}
# what MLflow writes next to them (registered_model_meta: a models:/ URI's download)
META_FILES = {
    "MLmodel",
    "conda.yaml",
    "python_env.yaml",
    "requirements.txt",
    "input_example.json",
    "serving_input_example.json",
    "registered_model_meta",
}
# the pyfunc flavour's keys (config: the load options), with the values they must have where it matters
FLAVOR_KEYS = {"loader_module", "data", "env", "python_version", "config", "streamable", "code"}
REREGISTER = (
    "re-register it: python tune/report.py --study STUDY --register NAME "
    "(on the cluster: docker compose run --rm register --study STUDY)"
)


class ModelRefused(ConfigError):
    """The downloaded model is not the LPT layout: the one line names the file."""


def check_model_dir(folder: str | Path, where: str = "") -> None:
    """Refuse (``ModelRefused``) a model folder that is not exactly the LPT layout; the line names
    the file as ``<where>/<file in the model>`` (``where``: the model's URI), else by its path."""
    root = Path(folder)

    def name(path: Path) -> str:
        return f"{where}/{path.relative_to(root).as_posix()}" if where else str(path)

    mlmodel = name(root / "MLmodel")
    try:
        meta = yaml.safe_load((root / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelRefused(f"{mlmodel}: not a readable MLmodel ({type(exc).__name__})") from None
    flavors = (meta.get("flavors") if isinstance(meta, dict) else None) or {}
    pyfunc = flavors.get("python_function")
    if not isinstance(pyfunc, dict):
        raise ModelRefused(f"{mlmodel}: no python_function flavour: not an LPT model")
    if "model_code_path" in pyfunc:
        raise ModelRefused(
            f"{mlmodel}: logged by an earlier version as a code file "
            f"({Path(str(pyfunc['model_code_path'])).name}), which is not run any more; {REREGISTER}"
        )
    if "python_model" in pyfunc:
        raise ModelRefused(f"{mlmodel}: a pickled python_model ({pyfunc['python_model']}), never loaded here")
    if set(flavors) != {"python_function"}:
        raise ModelRefused(f"{mlmodel}: other flavours ({', '.join(sorted(set(flavors) - {'python_function'}))})")
    if pyfunc.get("loader_module") != LOADER:
        raise ModelRefused(f"{mlmodel}: loader_module {pyfunc.get('loader_module')!r} is not {LOADER}")
    if pyfunc.get("code") is not None:  # a folder MLflow would put first on sys.path
        raise ModelRefused(f"{mlmodel}: python_function code {pyfunc['code']!r}: the LPT model has no code")
    extra = sorted(set(pyfunc) - FLAVOR_KEYS)
    if extra:
        raise ModelRefused(f"{mlmodel}: python_function has {', '.join(extra)}: not the LPT layout")
    if pyfunc.get("data") != DATA or pyfunc.get("streamable"):
        raise ModelRefused(f"{mlmodel}: python_function data is not {DATA}")
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            raise ModelRefused(f"{name(path)}: a link or special file in the model")
        if path.is_file() and relative not in DATA_FILES | META_FILES:
            what = "a code file" if path.suffix in (".py", ".pyc", ".so", ".pth") else "a file"
            raise ModelRefused(f"{name(path)}: {what} the LPT model does not have")
    missing = sorted(f for f in DATA_FILES if not (root / f).is_file())
    if missing:
        raise ModelRefused(f"{name(root / missing[0])}: missing from the model")


def fetch(uri: str, dst: str | Path) -> Path:
    """Download the model at ``uri`` into ``dst`` and check it; returns the local model folder."""
    import mlflow.artifacts

    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))
    check_model_dir(local, uri)
    return local


def main(argv: list[str] | None = None) -> int:
    import argparse

    from mlflow.exceptions import MlflowException

    from tune._cli import EXIT_BAD_INPUT, EXIT_FAILED, fail

    p = argparse.ArgumentParser(prog="python -m tune.serving.check", description=__doc__.splitlines()[0])
    p.add_argument("model", help="models:/NAME/VERSION, runs:/RUN_ID/model or a local model folder")
    p.add_argument("dst", help="an empty folder to download the model into")
    args = p.parse_args(argv)
    try:
        print(fetch(args.model, args.dst))
    except ModelRefused as exc:
        return fail(exc, EXIT_BAD_INPUT)
    except MlflowException as exc:
        return fail(f"{args.model}: {str(exc).strip().splitlines()[0]}", EXIT_FAILED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
