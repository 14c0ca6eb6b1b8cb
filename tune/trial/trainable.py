"""The Ray Tune function trainable: one trial is phase 2 of LPT on top of cached phase-1 prompts.

``run_trial(config, setup)`` reads its phase-1 prompts from the cache (the driver trained them up
front; the run's ``phase1_wait_s`` is how long it waited for them, 0 normally), trains phase 2 with
the sampled params, and after every epoch logs to its MLflow run and calls ``tune.report`` with a
checkpoint of the resumable trainer state. A retried or resumed trial starts from that checkpoint
in the same MLflow run. The helpers below also serve the
driver's test evaluation of the best trial and the confirmation runs with fresh seeds.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from mlflow import MlflowClient
from ray import tune

from lpt_core import LPT, PhaseConfig, Trainer, build_backbone_from_spec, evaluate, load_prompts, save_prompts
from lpt_core.trainer import resolve_device
from tune import names
from tune import tracking as mt
from tune.config.loading import profile_data
from tune.config.study import MODEL_KEYS, RECIPE_KEYS, SHOT_KEYS
from tune.phase1.cache import PROMPTS, STATE, Phase1Cache, phase1_key
from tune.trial.report import log_trial_report
from tune.trial.table import prompt_path

PHASE1_WAIT = "phase1_wait_s"  # trial-run metric: seconds the trial waited for its phase-1 prompts


@dataclass
class SearchSetup:
    """What every trial of a search shares; made by the driver, passed with ``tune.with_parameters``."""

    profile_name: str
    profile: dict
    manifest_hash: str
    search_dir: str
    cache_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metrics: tuple[str, ...]


def trial_settings(profile: dict, config: dict) -> tuple[dict, PhaseConfig]:
    """The model kwargs and phase-2 recipe of a trial: the profile's values, then the sampled ones."""
    model = {k: config.get(k, profile["model"][k]) for k in MODEL_KEYS}
    recipe = PhaseConfig.from_dict(
        {**profile["phase2"], **{k: config[k] for k in RECIPE_KEYS if k in config}}, where="phase2"
    )
    return model, recipe


def run_params(setup: SearchSetup, seed: int) -> dict:
    """What a trial or phase-1 run was trained on, besides its recipe, as MLflow params."""
    profile = setup.profile
    return {
        "seed": seed,
        "profile": setup.profile_name,
        "data": profile["data"]["name"],
        "backbone": profile["backbone"]["name"],
    }


def trial_params(setup: SearchSetup, config: dict) -> dict:
    model, recipe = trial_settings(setup.profile, config)
    return {**model, **recipe.to_dict(), **run_params(setup, setup.profile["seed"])}


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


def _trainer_kwargs(profile: dict, log) -> dict:
    return dict(
        device=trial_device(profile["device"]),
        num_workers=profile["loader"]["num_workers"],
        eval_batch_size=profile["loader"]["eval_batch_size"],
        compile=profile["compile"],
        shot_split=profile["shot_split"],
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
    torch.manual_seed(setup.profile["seed"])
    backbone = build_backbone_from_spec(setup.profile["backbone"])
    return LPT(backbone, data.num_classes, init_seed=seed, **model_kwargs), recipe


def phase1_inputs(profile: dict, manifest_hash: str, prompt_length: int, data, seed: int, device: str) -> dict:
    """Everything phase 1's prompts and head depend on, for its cache key. Not the phase-2 shape
    (``pool_size``, ``top_k``, ``group_start``): ``LPT`` draws the phase-1 tensors from
    generators of their own. ``device``: where it trains (``cuda`` trains under bf16 autocast);
    CPU-side augmentation draws its random crops in the loader workers, so their count counts."""
    on_device = data.train_batch_transform is not None
    return {
        "backbone": profile["backbone"],
        "data": manifest_hash,
        "input": data.input_cfg.to_dict(),
        "augment": "device" if on_device else f"cpu, {profile['loader']['num_workers']} loader workers",
        "prompt_length": prompt_length,
        "head_dropout": profile["model"]["head_dropout"],
        "recipe": PhaseConfig.from_dict(profile["phase1"], where="phase1").to_dict(),
        "precision": "bf16 autocast" if torch.device(device).type == "cuda" else "fp32",
        "compile": profile["compile"],
        "seed": seed,
    }


def planned_device(profile: dict) -> str:
    """Where a trial of ``profile`` will train, as the driver sees it before any task runs."""
    if profile["device"] != "auto":
        return profile["device"]
    return "cuda" if profile["resources"]["gpu"] > 0 else "cpu"


def profile_phase1_key(
    profile: dict, manifest_hash: str, prompt_length: int, data, seed: int, device: str | None = None
) -> str:
    """The phase-1 cache key of a profile's phase 1 at ``prompt_length`` and ``seed``, trained on
    ``device`` (default: ``planned_device``)."""
    return phase1_key(
        phase1_inputs(profile, manifest_hash, prompt_length, data, seed, device or planned_device(profile))
    )


def ensure_phase1(setup: SearchSetup, model: LPT, data, seed: int, client: MlflowClient, log) -> tuple[str, float]:
    """Load the shared prompts and head of phase 1 into ``model``; returns the key and the seconds
    spent waiting for its prompt file. The driver trains every phase 1 of a search up front
    (``tune.engine.phase1_upfront``), so a trial finds its key ready and waits 0 s; a key that is missing
    (a fresh seed, an entry deleted mid-search) is trained here, once per key, and the wait says so."""
    device = trial_device(setup.profile["device"])
    key = profile_phase1_key(setup.profile, setup.manifest_hash, model.prompt_length, data, seed, device)
    cache = Phase1Cache(setup.cache_dir)
    if cache.ready(key):
        path, trained, waited = cache.folder(key) / PROMPTS, False, 0.0
    else:
        started = time.monotonic()
        path, trained = cache.get_or_train(
            key, lambda folder: train_phase1(setup, model, data, seed, key, folder, client, log), log
        )
        waited = time.monotonic() - started
    if not trained:
        model.load_prompt_state_dict(load_prompts_partial(path), strict=False)
        log(f"phase 1 {key}: reusing cached prompts")
    return key, waited


def train_phase1(
    setup: SearchSetup, model: LPT, data, seed: int, key: str, folder: Path, client: MlflowClient, log
) -> dict:
    """Phase 1 of ``model`` into the cache entry ``folder``, resuming from its state file, in an
    MLflow run of its own (the same run again after a crash)."""
    recipe = PhaseConfig.from_dict(setup.profile["phase1"], where="phase1")
    run_id = mt.find_run(client, setup.experiment_id, **{names.ROLE: names.ROLE_PHASE1, names.PHASE1_KEY: key})
    if run_id is None:
        run_id = client.create_run(
            setup.experiment_id, run_name=f"phase1-{key}", tags={names.ROLE: names.ROLE_PHASE1, names.PHASE1_KEY: key}
        ).info.run_id
        mt.log(
            client, run_id, params={"prompt_length": model.prompt_length, **recipe.to_dict(), **run_params(setup, seed)}
        )
    else:
        client.update_run(run_id, status="RUNNING")
    logged = last_logged_epoch(client, run_id)
    trainer = seeded_trainer(setup, model, data, 1, recipe, seed, log)
    if (folder / STATE).is_file():
        trainer.load_state(folder / STATE)
        log(f"phase 1 {key}: resuming at epoch {trainer.epoch}")
    final: dict = {}
    try:
        for final in trainer.epochs():
            if final["epoch"] > logged:
                mt.log(client, run_id, metrics=run_metrics(final), step=final["epoch"])
            trainer.save_state(folder / STATE)
    except Exception as exc:
        mt.fail_run(client, run_id, exc)
        raise
    save_prompts(model, folder / PROMPTS, phase1_key=key)
    client.log_artifact(run_id, str(folder / PROMPTS))
    client.set_terminated(run_id, "FINISHED")
    return {"mlflow_run_id": run_id, "val_acc": final.get("val_acc")}


def load_prompts_partial(path: Path) -> dict:
    """The phase-1 tensors of a prompt file (shared prompts and head)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return {k: tensors[k] for k in ("shared_prompts", "head_weight")}


def _node_id() -> str:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return "local"


def run_trial(config: dict, setup: SearchSetup) -> None:
    """Ray Tune function trainable."""
    for name in ("ray.train", "ray.tune"):  # per-checkpoint INFO lines drown the epoch lines
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    node = _node_id()
    log = lambda msg: print(f"[{trial_id}] {msg}", flush=True)
    client = MlflowClient(setup.tracking_uri)
    seed = setup.profile["seed"]
    data = profile_data(setup.profile)
    model, recipe = build_model(setup, config, data, seed)
    run_id = mt.trial_run(
        client,
        setup.experiment_id,
        setup.parent_run_id,
        trial_id,
        f"trial-{trial_id}",
        trial_params(setup, config),
        {names.NODE: node, **({names.BASELINE: "true"} if config.get("baseline") else {})},
    )
    logged = last_logged_epoch(client, run_id)
    trainer = None
    try:
        key, waited = ensure_phase1(setup, model, data, seed, client, log)
        trainer = seeded_trainer(setup, model, data, 2, recipe, seed, log)
        mt.log(
            client,
            run_id,
            metrics={PHASE1_WAIT: waited},
            tags={
                names.PHASE1_KEY: key,
                names.DEVICE: str(trainer.device),  # lpt.node: set by trial_run
                names.GPU_IDS: ",".join(map(str, ray.get_gpu_ids())),
            },
        )
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                trainer.load_state(Path(folder) / STATE)
            log(f"resuming phase 2 at epoch {trainer.epoch} on node {node[:12]}")
            mt.log(client, run_id, tags={names.RESUMED_AT_EPOCH: trainer.epoch})

        for metrics in trainer.epochs():
            new = metrics["epoch"] > logged
            if new:
                mt.log(client, run_id, metrics=run_metrics(metrics), step=metrics["epoch"])
            if trainer.epoch == trainer.cfg.epochs:  # before the last report: Tune may end the actor right after it
                prompt_file = prompt_path(setup.search_dir, trial_id)
                save_prompts(model, prompt_file, trial_id=trial_id, phase1_key=key)
                if new:
                    client.log_artifact(run_id, str(prompt_file))
                    # validation figures as artifacts of the trial run (best effort)
                    log_trial_report(client, run_id, trainer, setup.experiment_id, key, log)
            with tempfile.TemporaryDirectory() as folder:
                trainer.save_state(Path(folder) / STATE)
                tune.report(
                    {**metrics, "mlflow_run_id": run_id, "node": node},
                    checkpoint=tune.Checkpoint.from_directory(folder),
                )
    except FloatingPointError as exc:  # diverged: a result for this config, not a crash to retry
        reason = str(exc)
        log(f"failed: {reason}")
        mt.fail_run(client, run_id, reason)
        tune.report(
            {
                **{m: math.nan for m in setup.metrics},
                "error": reason,
                "mlflow_run_id": run_id,
                "node": node,
                "epoch": trainer.epoch if trainer else 0,
            }
        )
        return
    except Exception as exc:
        mt.fail_run(client, run_id, exc)
        raise


def _test_metrics(setup: SearchSetup, model: LPT, data) -> dict:
    kw = _trainer_kwargs(setup.profile, None)
    device = resolve_device(kw["device"])
    model.set_phase(2)
    result = evaluate(
        model.to(device),
        data.test,
        data.class_counts,
        device=device,
        batch_size=kw["eval_batch_size"],
        num_workers=kw["num_workers"],
        batch_transform=data.eval_batch_transform,
        shot_split=kw["shot_split"],
    )
    return {f"test_{k}": result[k] for k in SHOT_KEYS}


def evaluate_prompts(setup: SearchSetup, config: dict, prompt_file: str) -> dict:
    """Test accuracy of a trial's saved prompts (the driver runs this on the best trial)."""
    data = profile_data(setup.profile)
    model, _ = build_model(setup, config, data, setup.profile["seed"])
    load_prompts(model, prompt_file)
    return _test_metrics(setup, model, data)


def confirm_seed(setup: SearchSetup, config: dict, seed: int) -> dict:
    """Retrain a config from scratch with ``seed`` (its own phase 1) and return test accuracy."""
    client = MlflowClient(setup.tracking_uri)
    log = lambda msg: print(f"[confirm seed {seed}] {msg}", flush=True)
    data = profile_data(setup.profile)
    model, recipe = build_model(setup, config, data, seed)
    ensure_phase1(setup, model, data, seed, client, log)
    seeded_trainer(setup, model, data, 2, recipe, seed, log).fit()
    return _test_metrics(setup, model, data)
