"""The plan of a search: the study and profile loaded and checked, the data and backbone described,
everything settled before Ray starts (no Ray, no MLflow)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lpt_core.sampling import steps_per_epoch
from tune.config.study import ProfileConfig
from tune.errors import ConfigError
from tune.names import PHASE1_CACHE
from tune.storage import Location


class Plan:
    """Everything checked before Ray starts."""

    def __init__(self, args: argparse.Namespace):
        from lpt_core.backbones import build_architecture, build_backbone_from_spec, input_config
        from lpt_core.data.spec_counts import DataSummary, data_summary
        from tune.config.budget import check_budget, given_budget
        from tune.config.checks import check_storage_env
        from tune.config.early_stopping import grace_epochs
        from tune.config.loading import load_profile, load_study, objective_of, profile_data, split_overrides
        from tune.config.search_space import baseline_config, check_baseline, check_prompt_lengths, check_space
        from tune.config.validation import check_disjoint, check_objectives

        self.dry_run = args.dry_run
        profile_sets, study_sets = split_overrides(args.set)
        study_sets += budget_flags(args)
        self.budget_given = given_budget(study_sets)  # what --resume changes of a search's budget
        self.study_path, self.study = load_study(args.study, study_sets)
        self.profile_path, self.profile = load_profile(args.profile, profile_sets)
        self.study_name, self.profile_name = self.study_path.stem, self.profile_path.stem
        if args.trials is not None:
            if args.trials < 1:
                raise ConfigError(f"--trials: must be >= 1, got {args.trials}")
            self.study.budget.trials = args.trials
        if args.confirm < 0:
            raise ConfigError(f"--confirm: must be >= 0, got {args.confirm}")
        if args.register:
            from tune.config.checks import check_model_name

            check_model_name(args.register)
        self.profile = absolute_paths(self.profile)
        check_budget(self.study, self.profile, str(self.study_path))
        study, profile = self.study, self.profile
        try:
            self.input_cfg = input_config(profile.backbone.spec(), profile.input)
            if args.dry_run:  # the architecture, and the data's sizes from what is here: no weights, no download
                backbone = build_architecture(profile.backbone.spec())
                self.summary = data_summary(profile.data, self.input_cfg)
            else:  # a search refuses here, before Ray starts, when the weights or the data are missing
                backbone = build_backbone_from_spec(profile.backbone.spec())
                self.summary = DataSummary.of(profile_data(self.profile))
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"{self.profile_path}: {exc}") from None
        self.data = self.summary.data  # None in a dry run without the data's lists or files
        self.depth = len(getattr(backbone, "blocks", []))
        self.phase1, self.phase2 = profile.phase1, profile.phase2  # checked by ProfileConfig
        dataset = profile.data.name
        check_disjoint(self.data, dataset, str(self.profile_path))
        check_objectives(
            objective_of(study.objective)[0], self.summary, profile.shot_split, dataset, str(self.study_path)
        )
        grace_epochs(study.early_stopping, self.phase2, str(self.study_path), study.space)
        check_space(study.space, profile.model, self.depth, str(self.study_path))
        check_prompt_lengths(study.space, study.budget.trials, str(self.study_path))
        self.baseline = baseline_config(study.space, profile.model, profile.phase2) if study.baseline.enabled else None
        self.baseline_notes = check_baseline(study.space, self.baseline, str(self.study_path)) if self.baseline else []
        self.manifest_hash = self.summary.manifest_hash
        self.storage = Location(args.storage or os.environ.get("LPT_STORAGE", "").strip() or "runs")
        check_storage_env()

    def describe(self) -> str:
        from tune.config import early_stopping, validation
        from tune.config.input_capacity import capacity_lines
        from tune.config.loading import objective_of
        from tune.config.samplers import describe_sampler, sampler_settings
        from tune.config.search_space import describe, prompt_lengths

        study, profile = self.study, self.profile
        b, r = study.budget, profile.resources
        lengths = prompt_lengths(study.space, profile.model.prompt_length)
        n_phase1 = len(lengths)  # all trained up front (check_prompt_lengths keeps it within the budget)
        metrics = objective_of(study.objective)[0]
        lines = [
            f"study {self.study_name} ({self.study_path}), profile {self.profile_name} ({self.profile_path})",
            self.data_line(),
            *([f"not computed here: {'; '.join(self.summary.missing)}"] if self.summary.missing else []),
            validation.describe(self.summary),
            self.backbone_line(),
            f"input: {describe_input(self.input_cfg)}",
            "search space:",
            *[f"  {line}" for line in describe(study.space, self.depth)],
            f"objective: {study.objective.model_dump(exclude_none=True)}",
            f"budget: {b.trials} trials, {b.concurrency} at a time, up to {b.max_failures} retries each",
            f"sampler: {describe_sampler(sampler_settings(study, b.trials), b.trials)}",
            f"phase 1: {self.phase1.describe(1)}",
            f"phase 2: {self.phase2.describe(2)}",
            early_stopping.describe(
                study.early_stopping, self.phase2, metrics[0], len(metrics), study.space, self.summary.val
            ),
            self.baseline_line(),
            f"phase-1 trainings: {n_phase1}, up front before the trials (one per prompt_length in "
            f"{lengths if len(lengths) <= 12 else f'{lengths[0]}..{lengths[-1]}'}; a cached one is not "
            f"trained again: {self.storage / PHASE1_CACHE})",
            f"resources per trial: {r.cpu:g} CPU, {r.gpu:g} GPU"
            + (f" ({int(1 / r.gpu)} trials per GPU)" if 0 < r.gpu < 1 else "")
            + (", compiled blocks" if profile.compile else ""),
            *capacity_lines(profile),
            *self.cost_lines(n_phase1),
        ]
        return "\n".join(lines)

    def data_line(self) -> str:
        s, count = self.summary, lambda n: "?" if n is None else f"{n:,}"
        return (
            f"data: {self.profile.data.name}, {count(s.num_classes)} classes, {count(s.train)} train / "
            f"{count(s.val)} val / {count(s.test)} test images; manifest "
            + (s.manifest_hash[:12] if s.manifest_hash else "not computed")
        )

    def backbone_line(self) -> str:
        from lpt_core.backbones import weights_source

        spec = self.profile.backbone
        weights = spec.weights
        checked = (
            f": not checked by a dry run; a search takes them from {weights_source(spec.spec())}"
            if self.dry_run and weights != "random"
            else ""
        )
        return f"backbone: {spec.name} ({self.depth} blocks), weights {weights}{checked}"

    def baseline_line(self) -> str:
        if self.baseline is None:
            return "baseline: off (baseline.enabled: false)"
        values = ", ".join(f"{k}={v}" for k, v in self.baseline.items())
        exempt = self.study.baseline.exempt_from_early_stopping and self.study.early_stopping.enabled
        return (
            f"baseline: the first trial runs the profile's values ({values})"
            + (", every epoch (exempt from early stopping)" if exempt else "")
            + "".join(f"; note: {n}" for n in self.baseline_notes)
        )

    def phase_images(self, name: str) -> tuple[int, str]:
        """Training images of one run of phase ``name`` (``phase1`` / ``phase2``), and in words."""
        n_train, n_val = self.summary.train or 0, self.summary.val or 0  # the callers know train
        cfg = getattr(self, name)
        steps = steps_per_epoch(n_train, cfg.batch_size, cfg.sampling)  # an epoch of the trainer's sampler
        branches = 2 if cfg.sampling == "dual" else 1
        images = cfg.epochs * steps * branches * cfg.batch_size
        return images, (
            f"{cfg.epochs} epochs x {steps} steps x {'2x' if branches == 2 else ''}{cfg.batch_size}"
            f" = {images:,} images (+ {cfg.epochs * n_val:,} evaluated)"
        )

    def trial_estimate_s(self) -> float | None:
        """A whole trial's seconds at the profile's ``images_per_s``; None without it."""
        rate = self.profile.images_per_s
        return self.phase_images("phase2")[0] / rate if rate and self.summary.train else None

    def cost_lines(self, n_phase1: int) -> list[str]:
        """Images each trial trains on, GPU-hours (CPU-core-hours for CPU trials or a CPU-hour
        budget) at the profile's ``images_per_s`` estimate, and what the budget pays for."""
        from tune.config.budget import MEASURES, measure_of, plan_lines

        if self.summary.train is None:
            return ["cost: not computed (the training set's size is not known here)"]
        trials = self.study.budget.trials
        (phase1, phase1_text), (phase2, phase2_text) = self.phase_images("phase1"), self.phase_images("phase2")
        total = trials * phase2 + n_phase1 * phase1
        lines = [
            f"cost per trial: phase 2 trains {phase2_text}",
            f"cost per phase 1 ({n_phase1}, unless cached): {phase1_text}",
            f"cost of the search: at most {total:,} training images ({trials} whole trials; ASHA stops some early)",
        ]
        rate = self.profile.images_per_s
        key, label = MEASURES[measure_of(self.study.budget, self.profile.resources)]
        unit = label.replace("hours", "h")
        if rate:
            hours = lambda n: n / rate / 3600 * getattr(self.profile.resources, key)
            lines.append(
                f"{label.split('-')[0]} time at {rate:g} img/s: {hours(phase2):.2f} {unit} per trial, "
                f"{hours(phase1):.2f} per phase 1, at most {hours(total):.1f} {unit} for the search"
            )
        else:
            lines.append(
                f"{label.split('-')[0]} time: add --set images_per_s=N (the training img/s of one trial, e.g. "
                f"from benchmarks/step_throughput.py on your GPU) for {label}"
            )
        return lines + plan_lines(self.study, self.profile, phase2, phase1, n_phase1)


def describe_input(cfg) -> str:
    fmt = lambda xs: "/".join(f"{x:.3g}" for x in xs)
    resize = cfg.eval_resize.replace("_", "-")
    return (
        f"mean {fmt(cfg.mean)}, std {fmt(cfg.std)}, {cfg.interpolation}, eval {resize} resize, crop {cfg.crop_pct:.3g}"
    )


def absolute_paths(profile: ProfileConfig) -> ProfileConfig:
    """``profile`` with relative data and weight paths made absolute: they are relative to where
    the search starts, not to a worker; a data file (a list, a json, class names) relative to
    ``data.root`` where it is there, as the dataset specs read them."""
    here = lambda value: Path(os.path.expanduser(value)).resolve()
    root = getattr(profile.data, "root", None)
    base = str(here(root)) if isinstance(root, str) else None
    paths = {"root": base} if base else {}
    for key in type(profile.data).model_fields:
        value = getattr(profile.data, key)
        if isinstance(value, str) and (key == "class_names" or key.endswith(("_list", "_json"))):
            under_root = Path(base or ".", os.path.expanduser(value))
            paths[key] = str(under_root.resolve() if under_root.is_file() else here(value))
    update: dict = {"data": profile.data.model_copy(update=paths)}
    weights = profile.backbone.weights
    if weights not in ("pretrained", "random"):
        update["backbone"] = profile.backbone.model_copy(update={"weights": str(here(weights))})
    return profile.model_copy(update=update)


def budget_flags(args: argparse.Namespace) -> list[str]:
    """``--gpu-hours`` / ``--cpu-hours`` as study overrides; either one replaces the study's budget."""
    flags = []
    for measure, other in (("gpu_hours", "cpu_hours"), ("cpu_hours", "gpu_hours")):
        hours = getattr(args, measure, None)
        if hours is not None:
            flags += [f"budget.{measure}={hours!r}", f"budget.{other}=null"]
    return flags
