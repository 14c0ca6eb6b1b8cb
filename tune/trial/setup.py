"""What a trial is built from: the search's settings (SearchSetup), a trial's model and recipe, its
device, its trainer and run parameters."""

from __future__ import annotations

from dataclasses import dataclass

import ray
import torch
from mlflow import MlflowClient

from lpt_core import LPT, PhaseConfig, Trainer, build_backbone_from_spec
from tune.config.space import MODEL_KEYS, RECIPE_KEYS
from tune.config.study import ProfileConfig


@dataclass
class SearchSetup:
    """What every trial of a search shares; made by the driver, passed with ``tune.with_parameters``."""

    profile_name: str
    profile: ProfileConfig  # pickled with the setup into every trial and task
    manifest_hash: str
    search_dir: str
    cache_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metrics: tuple[str, ...]


def trial_settings(profile: ProfileConfig, config: dict) -> tuple[dict, PhaseConfig]:
    """The model kwargs and phase-2 recipe of a trial: the profile's values, then the sampled ones
    (``config``: the trial's Ray config, a dict of sampled values)."""
    model = {**profile.model.model_dump(), **{k: config[k] for k in MODEL_KEYS if k in config}}
    recipe = PhaseConfig.from_dict(
        {**profile.phase2.model_dump(), **{k: config[k] for k in RECIPE_KEYS if k in config}}, where="phase2"
    )
    return model, recipe


def run_params(setup: SearchSetup, seed: int) -> dict:
    """What a trial or phase-1 run was trained on, besides its recipe, as MLflow params."""
    return {
        "seed": seed,
        "profile": setup.profile_name,
        "data": setup.profile.data.name,
        "backbone": setup.profile.backbone.name,
    }


def trial_params(setup: SearchSetup, config: dict) -> dict:
    model, recipe = trial_settings(setup.profile, config)
    return {**model, **recipe.to_dict(), **run_params(setup, setup.profile.seed)}


def trial_device(setting: str) -> str:
    """``auto`` is the GPU Ray gave this task, else the CPU. Ray leaves CUDA_VISIBLE_DEVICES alone
    for a task that asked for no GPU, so torch alone would pick a GPU it was never given."""
    if setting != "auto":
        return setting
    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    return "cuda" if gpus and torch.cuda.is_available() else "cpu"


def last_logged_epoch(client: MlflowClient, run_id: str) -> int:
    """The last epoch ``run_id`` holds. A resumed trial re-runs the epochs after its checkpoint
    (exactly: the checkpoint holds the RNG states), and those the run has already are not logged
    a second time."""
    return max((m.step for m in client.get_metric_history(run_id, "train_loss")), default=0)


def run_metrics(metrics: dict) -> dict:
    """What an epoch logs to MLflow: the figures worth comparing across runs (``epoch`` is the
    step of each point, ``phase`` a constant of the run)."""
    return {k: v for k, v in metrics.items() if k not in ("epoch", "phase")}


def _trainer_kwargs(profile: ProfileConfig, log) -> dict:
    return dict(
        device=trial_device(profile.device),
        num_workers=profile.loader.num_workers,
        eval_batch_size=profile.loader.eval_batch_size,
        compile=profile.compile,
        shot_split=profile.shot_split,
        log=log,
    )


def seeded_trainer(setup: SearchSetup, model: LPT, data, phase: int, recipe: PhaseConfig, seed: int, log) -> Trainer:
    """A trainer of ``phase`` whose global RNG (dropout, crops) starts from ``seed``, whether or not
    this process trained anything before (a phase 1 that was not cached)."""
    torch.manual_seed(seed)
    return Trainer(model, data, phase, recipe, seed=seed, **_trainer_kwargs(setup.profile, log))


def build_model(setup: SearchSetup, config: dict, data, seed: int) -> tuple[LPT, PhaseConfig]:
    """The trial's LPT. A randomly initialised backbone depends on the profile's seed only, so
    every trial, the test evaluation and the confirmation runs see the same one; the prompts and
    head start from ``seed``'s own generators (``LPT(init_seed=...)``), whatever the phase-2 shape."""
    model_kwargs, recipe = trial_settings(setup.profile, config)
    torch.manual_seed(setup.profile.seed)
    backbone = build_backbone_from_spec(setup.profile.backbone.spec())
    return LPT(backbone, data.num_classes, init_seed=seed, **model_kwargs), recipe
