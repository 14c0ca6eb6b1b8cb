"""A trial's phase 1: what its key hashes, finding it in the phase-1 cache or training it (resumable),
and loading its prompts."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from mlflow import MlflowClient

from lpt_core import LPT, save_prompts
from tune import names
from tune import tracking as mt
from tune.config.study import ProfileConfig
from tune.names import PHASE1_PROMPTS, PHASE1_STATE
from tune.phase1.cache import Phase1Cache, phase1_key
from tune.storage import Location
from tune.trial.setup import SearchSetup, last_logged_epoch, run_metrics, run_params, seeded_trainer, trial_device


def phase1_inputs(
    profile: ProfileConfig,
    manifest_hash: str,
    prompt_length: int,
    data,
    seed: int,
    device: str,
    head_dropout: float | None = None,
) -> dict:
    """Everything phase 1's prompts and head depend on, for its cache key. Not the phase-2 shape
    (``pool_size``, ``top_k``, ``group_start``): ``LPT`` draws the phase-1 tensors from
    generators of their own. ``device``: where it trains (``cuda`` trains under bf16 autocast);
    CPU-side augmentation draws its random crops in the loader workers, so their count counts.
    ``image_size``: the side the model sees (the manifest names the images, not their resizing).
    ``head_dropout``: the one the training model has (a trial's own, or a confirmation's), default
    the profile's."""
    on_device = data.train_batch_transform is not None
    return {
        "backbone": profile.backbone.spec(),  # as written: a default spelt out keys the same phase 1
        "data": manifest_hash,
        "image_size": data.image_size,
        "input": data.input_cfg.to_dict(),
        "augment": "device" if on_device else f"cpu, {profile.loader.num_workers} loader workers",
        "prompt_length": prompt_length,
        "head_dropout": profile.model.head_dropout if head_dropout is None else head_dropout,
        "recipe": profile.phase1.to_dict(),
        "precision": "bf16 autocast" if torch.device(device).type == "cuda" else "fp32",
        "compile": profile.compile,
        "seed": seed,
    }


def planned_device(profile: ProfileConfig) -> str:
    """Where a trial of ``profile`` will train, as the driver sees it before any task runs."""
    if profile.device != "auto":
        return profile.device
    return "cuda" if profile.resources.gpu > 0 else "cpu"


def profile_phase1_key(
    profile: ProfileConfig,
    manifest_hash: str,
    prompt_length: int,
    data,
    seed: int,
    device: str | None = None,
    head_dropout: float | None = None,
) -> str:
    """The phase-1 cache key of a profile's phase 1 at ``prompt_length`` and ``seed``, trained on
    ``device`` (default: ``planned_device``) by a model with ``head_dropout`` (default: the profile's)."""
    device = device or planned_device(profile)
    return phase1_key(phase1_inputs(profile, manifest_hash, prompt_length, data, seed, device, head_dropout))


PHASE1_WAIT = "phase1_wait_s"  # trial-run metric: seconds the trial waited for its phase-1 prompts


def wait_metrics(waited: float) -> dict[str, float]:
    """What a trial logs of its wait for phase 1: ``phase1_wait_s`` when it waited, nothing when its
    key was ready (a constant 0 is not a metric)."""
    return {PHASE1_WAIT: waited} if waited > 0 else {}


def ensure_phase1(setup: SearchSetup, model: LPT, data, seed: int, client: MlflowClient, log) -> tuple[str, float]:
    """Load the shared prompts and head of phase 1 into ``model``; returns the key and the seconds
    spent waiting for its prompt file. The driver trains every phase 1 of a search up front
    (``tune.engine.phase1_upfront``), so a trial finds its key ready and waits 0 s; a key that is missing
    (a fresh seed, an entry deleted mid-search) is trained here, once per key, and the wait says so."""
    device = trial_device(setup.profile.device)
    key = profile_phase1_key(
        setup.profile, setup.manifest_hash, model.prompt_length, data, seed, device, model.config.head_dropout
    )
    cache = Phase1Cache(setup.cache_dir)
    if cache.ready(key):
        path, trained, waited = cache.folder(key) / PHASE1_PROMPTS, False, 0.0
    else:
        started = time.monotonic()
        path, trained = cache.get_or_train(
            key, lambda folder: train_phase1(setup, model, data, seed, key, folder, client, log), log
        )
        waited = time.monotonic() - started
    if not trained:
        with path.local_copy() as local:
            model.load_prompt_state_dict(load_prompts_partial(local), strict=False)
        log(f"phase 1 {key}: reusing cached prompts")
    return key, waited


def train_phase1(
    setup: SearchSetup, model: LPT, data, seed: int, key: str, folder: Location, client: MlflowClient, log
) -> dict:
    """Phase 1 of ``model`` into the cache entry ``folder``, resuming from its state file, in an
    MLflow run of its own (the same run again after a crash). It trains in a scratch folder of this
    machine and publishes each epoch's state, then the prompt file, into the entry."""
    with tempfile.TemporaryDirectory(prefix="lpt-phase1-") as scratch:
        return _train_phase1(setup, model, data, seed, key, folder, Path(scratch), client, log)


def _train_phase1(
    setup: SearchSetup,
    model: LPT,
    data,
    seed: int,
    key: str,
    folder: Location,
    scratch: Path,
    client: MlflowClient,
    log,
) -> dict:
    recipe = setup.profile.phase1
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
    state, prompts = scratch / PHASE1_STATE, scratch / PHASE1_PROMPTS
    if (folder / PHASE1_STATE).is_file():
        trainer.load_state((folder / PHASE1_STATE).download(state))
        log(f"phase 1 {key}: resuming at epoch {trainer.epoch}")
    final: dict = {}
    try:
        for final in trainer.epochs():
            if final["epoch"] > logged:
                mt.log(client, run_id, metrics=run_metrics(final), step=final["epoch"])
            trainer.save_state(state)
            (folder / PHASE1_STATE).upload(state)
    except Exception as exc:
        mt.fail_run(client, run_id, exc)
        raise
    save_prompts(model, prompts, phase1_key=key)
    (folder / PHASE1_PROMPTS).upload(prompts)  # last: the entry is ready from here on
    client.log_artifact(run_id, str(prompts))
    client.set_terminated(run_id, "FINISHED")
    return {"mlflow_run_id": run_id, "val_acc": final.get("val_acc")}


def load_prompts_partial(path: Path) -> dict:
    """The phase-1 tensors of a prompt file (shared prompts and head)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return {k: tensors[k] for k in ("shared_prompts", "head_weight")}
