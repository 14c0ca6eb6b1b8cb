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

from lpt_core.trainer import PhaseConfig  # noqa: E402
from tune.names import PHASE1_CACHE  # noqa: E402
from tune.study_config import ConfigError  # noqa: E402

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune/search.py", description=__doc__.splitlines()[0])
    p.add_argument("--study", help="a file in studies/ (name or .yaml path); required unless --schema")
    p.add_argument("--profile", default="smoke", help="a file in studies/profiles/ or a .yaml path (default: smoke)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a profile value, e.g. --set phase2.epochs=3 (repeatable)")
    p.add_argument("--trials", type=int, help="trial budget (default: the study's)")
    p.add_argument("--storage", help="search folder root, shared by all nodes (default: ./runs or $LPT_STORAGE)")
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted search of this study and profile")
    p.add_argument("--confirm", type=int, default=0, metavar="N",
                   help="retrain the best config with N fresh seeds and report test accuracy mean and std")
    p.add_argument("--dry-run", action="store_true", help="check and describe the search, train nothing")
    p.add_argument("--register", nargs="?", const="", metavar="NAME",
                   help="log the best trial as an MLflow model and register it as NAME (default: <study>-<profile>)")
    p.add_argument("--schema", choices=("study", "profile"),
                   help="print the JSON Schema of a study or a profile file and exit")
    args = p.parse_args(argv)
    if not args.schema and not args.study:
        p.error("the following arguments are required: --study")
    return args


class Plan:
    """Everything checked before Ray starts."""

    def __init__(self, args: argparse.Namespace):
        from lpt_core.backbones import build_backbone_from_spec
        from lpt_core.data.manifest import manifest_hash
        from tune.optuna_storage import check_storage_env
        from tune.search_space import baseline_config, check_baseline, check_prompt_lengths, check_space
        from tune.early_stopping import grace_epochs
        from tune.study_config import load_profile, load_study, objective_of, profile_data
        from tune.validation import check_disjoint, check_objectives

        self.study_path, self.study = load_study(args.study)
        self.profile_path, self.profile = load_profile(args.profile, args.set)
        self.study_name, self.profile_name = self.study_path.stem, self.profile_path.stem
        if args.trials is not None:
            if args.trials < 1:
                raise ConfigError(f"--trials: must be >= 1, got {args.trials}")
            self.study["budget"]["trials"] = args.trials
        if args.confirm < 0:
            raise ConfigError(f"--confirm: must be >= 0, got {args.confirm}")
        if args.register:
            from tune.model_registry import check_model_name
            check_model_name(args.register)
        absolute_paths(self.profile)
        try:
            backbone = build_backbone_from_spec(self.profile["backbone"])
            self.data = profile_data(self.profile)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"{self.profile_path}: {exc}") from None
        self.depth = len(getattr(backbone, "blocks", []))
        self.phase1 = PhaseConfig.from_dict(self.profile["phase1"], where=f"{self.profile_path}: phase1")
        self.phase2 = PhaseConfig.from_dict(self.profile["phase2"], where=f"{self.profile_path}: phase2")
        dataset = self.profile["data"]["name"]
        check_disjoint(self.data, dataset, str(self.profile_path))
        check_objectives(objective_of(self.study["objective"])[0], self.data, self.profile["shot_split"], dataset,
                         str(self.study_path))
        grace_epochs(self.study["early_stopping"], self.phase2, str(self.study_path))
        check_space(self.study["space"], self.profile["model"], self.depth, str(self.study_path))
        check_prompt_lengths(self.study["space"], self.study["budget"]["trials"], str(self.study_path))
        self.baseline = (baseline_config(self.study["space"], self.profile["model"], self.profile["phase2"])
                         if self.study["baseline"]["enabled"] else None)
        self.baseline_notes = (check_baseline(self.study["space"], self.baseline, str(self.study_path))
                               if self.baseline else [])
        self.manifest_hash = manifest_hash(self.data)
        self.storage = Path(os.path.expanduser(args.storage or os.environ.get("LPT_STORAGE", "runs"))).resolve()
        check_storage_env()
        if "://" in str(args.storage or ""):
            raise ConfigError(f"--storage {args.storage}: give a folder on a filesystem every node mounts")

    def describe(self) -> str:
        from tune import early_stopping, validation
        from tune.samplers import describe_sampler, sampler_settings
        from tune.search_space import describe, prompt_lengths
        from tune.study_config import objective_of
        b, r = self.study["budget"], self.profile["resources"]
        lengths = prompt_lengths(self.study["space"], self.profile["model"]["prompt_length"])
        n_phase1 = len(lengths)  # all trained up front (check_prompt_lengths keeps it within the budget)
        metrics = objective_of(self.study["objective"])[0]
        lines = [f"study {self.study_name} ({self.study_path}), profile {self.profile_name} ({self.profile_path})",
                 f"data: {self.profile['data']['name']}, {self.data.num_classes} classes, "
                 f"{len(self.data.train_labels)} train / {len(self.data.val)} val / {len(self.data.test)} test images; "
                 f"manifest {self.manifest_hash[:12]}",
                 validation.describe(self.data),
                 f"backbone: {self.profile['backbone']['name']} ({self.depth} blocks), weights {self.profile['backbone'].get('weights', 'pretrained')}",
                 f"input: {describe_input(self.data.input_cfg)}",
                 "search space:", *[f"  {line}" for line in describe(self.study["space"], self.depth)],
                 f"objective: {self.study['objective']}",
                 f"budget: {b['trials']} trials, {b['concurrency']} at a time, up to {b['max_failures']} retries each",
                 f"sampler: {describe_sampler(sampler_settings(self.study, b['trials']), b['trials'])}",
                 f"phase 1: {self.phase1.describe(1)}",
                 f"phase 2: {self.phase2.describe(2)}",
                 early_stopping.describe(self.study["early_stopping"], self.phase2, metrics[0], len(metrics)),
                 self.baseline_line(),
                 f"phase-1 trainings: {n_phase1}, up front before the trials (one per prompt_length in "
                 f"{lengths if len(lengths) <= 12 else f'{lengths[0]}..{lengths[-1]}'}; a cached one is not "
                 f"trained again: {self.storage / PHASE1_CACHE})",
                 f"resources per trial: {r['cpu']:g} CPU, {r['gpu']:g} GPU"
                 + (f" ({int(1 / r['gpu'])} trials per GPU)" if 0 < r["gpu"] < 1 else "")
                 + (", compiled blocks" if self.profile["compile"] else ""),
                 *self.cost_lines(n_phase1)]
        return "\n".join(lines)

    def baseline_line(self) -> str:
        if self.baseline is None:
            return "baseline: off (baseline.enabled: false)"
        values = ", ".join(f"{k}={v}" for k, v in self.baseline.items())
        exempt = self.study["baseline"]["exempt_from_early_stopping"] and self.study["early_stopping"]["enabled"]
        return (f"baseline: the first trial runs the profile's values ({values})"
                + (", every epoch (exempt from early stopping)" if exempt else "")
                + "".join(f"; note: {n}" for n in self.baseline_notes))

    def cost_lines(self, n_phase1: int) -> list[str]:
        """Images each trial trains on, and GPU-hours at the profile's ``images_per_s`` estimate."""
        n_train, n_val, trials = len(self.data.train_labels), len(self.data.val), self.study["budget"]["trials"]

        def phase(name: str) -> tuple[int, str]:
            cfg = getattr(self, name)
            steps = max(1, n_train // cfg.batch_size)  # an epoch of the trainer's sampler
            branches = 2 if cfg.sampling == "dual" else 1
            images = cfg.epochs * steps * branches * cfg.batch_size
            return images, (f"{cfg.epochs} epochs x {steps} steps x {'2x' if branches == 2 else ''}{cfg.batch_size}"
                            f" = {images:,} images (+ {cfg.epochs * n_val:,} evaluated)")
        (phase1, phase1_text), (phase2, phase2_text) = phase("phase1"), phase("phase2")
        total = trials * phase2 + n_phase1 * phase1
        lines = [f"cost per trial: phase 2 trains {phase2_text}",
                 f"cost per phase 1 ({n_phase1}, unless cached): {phase1_text}",
                 f"cost of the search: at most {total:,} training images ({trials} whole trials; ASHA stops some early)"]
        rate = self.profile.get("images_per_s")
        if rate:
            hours = lambda n: n / rate / 3600
            lines.append(f"GPU time at {rate:g} img/s: {hours(phase2):.2f} GPU-h per trial, "
                         f"{hours(phase1):.2f} per phase 1, at most {hours(total):.1f} GPU-h for the search")
        else:
            lines.append("GPU time: add --set images_per_s=N (the training img/s of one trial, e.g. from "
                         "benchmarks/step_throughput.py on your GPU) for GPU-hours")
        return lines


def describe_input(cfg) -> str:
    fmt = lambda xs: "/".join(f"{x:.3g}" for x in xs)
    resize = cfg.eval_resize.replace("_", "-")
    return f"mean {fmt(cfg.mean)}, std {fmt(cfg.std)}, {cfg.interpolation}, eval {resize} resize, crop {cfg.crop_pct:.3g}"


def absolute_paths(profile: dict) -> None:
    """Relative data and weight paths are relative to where the search starts, not to a worker;
    a data file (a list, a json, class names) relative to ``data.root`` where it is there, as
    the dataset specs read them."""
    data = profile["data"]
    here = lambda value: Path(os.path.expanduser(value)).resolve()
    if isinstance(data.get("root"), str):
        data["root"] = str(here(data["root"]))
    for key, value in data.items():
        if isinstance(value, str) and (key == "class_names" or key.endswith(("_list", "_json"))):
            under_root = Path(data.get("root") or ".", os.path.expanduser(value))
            data[key] = str(under_root.resolve() if under_root.is_file() else here(value))
    weights = profile["backbone"].get("weights")
    if isinstance(weights, str) and weights not in ("pretrained", "random"):
        profile["backbone"]["weights"] = str(Path(os.path.expanduser(weights)).resolve())


def check_ray_address() -> str | None:
    """RAY_ADDRESS, checked to answer before anything starts; None means a local Ray."""
    from tune.mlflow_tracking import ServiceError
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


def run(args: argparse.Namespace) -> int:
    from tune.mlflow_tracking import check_tracking_uri, resolve_tracking_uri
    if args.schema:
        from tune.study_config import schema
        print(json.dumps(schema(args.schema), indent=2))
        return 0
    plan = Plan(args)
    if args.dry_run:
        print(plan.describe())
        return 0
    uri = resolve_tracking_uri()
    check_tracking_uri(uri)
    address = check_ray_address()
    if address:
        from tune.cluster_checks import check_cluster_tracking  # imports Ray: not for a dry run
        check_cluster_tracking(uri)
    from tune.driver import run_search
    return run_search(plan, args, uri, address)


def main(argv: list[str] | None = None) -> int:
    """Exit 2 with one line for bad input, 1 with one line for a service or download that fails."""
    args = parse_args(argv)
    from lpt_core.data import DownloadError
    from tune.mlflow_tracking import ServiceError
    try:
        return run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ServiceError, DownloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
