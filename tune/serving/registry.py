"""Register a search's best trial in the MLflow Model Registry (``tune/search.py --register``,
``tune/report.py --register``).

The trial's prompts are logged as the LPT pyfunc model (``tune/serving/model.py``) on a run of its
own in the experiment ``lpt-models`` (``runs:/<model run id>/model``; the run is tagged with the
trial, its run and the search's parent run), not on the trial's run: on the cluster only the
registering identity (``registrar``) may write that experiment, while the searcher, which every
Ray node holds, may write the studies' experiments. The model is registered as a new version of
``NAME`` (default ``<study>-<profile>``), tagged with the trial id, the search's parent run, the
study and profile, and the validation and test accuracies (``val_acc``, ``test_acc``, ... in
percent). The parent run gets the tag ``lpt.model_uri`` = ``models:/NAME/VERSION``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from lpt_core.inference import classifier_config
from tune import names
from tune import tracking as mt
from tune.config.study import SHOT_KEYS, ProfileConfig
from tune.errors import error_line
from tune.record import load_record
from tune.serving import model as lpt_model
from tune.storage import Location, location

if TYPE_CHECKING:  # the table module imports Ray: imported where the table is read
    from tune.trial.table import TrialRow

MODEL_URI_TAG, REGISTER_ERROR_TAG = names.MODEL_URI, names.REGISTER_ERROR
VERSION_TRIAL, VERSION_PARENT, VERSION_STUDY, VERSION_PROFILE = (
    names.TRIAL_ID,
    names.VERSION_PARENT_RUN,
    names.VERSION_STUDY,
    names.VERSION_PROFILE,
)


MODELS_EXPERIMENT = "lpt-models"  # where registered models' runs are; the cluster's registrar alone writes it
MODEL_RUN = "model"  # lpt.role of such a run
TRIAL_RUN_TAG = "lpt.trial_run_id"


class RegisterError(RuntimeError):
    """Logging or registering the model failed: one line."""


class NothingToRegister(RegisterError):
    """The search's records lack what a model needs (best trial, its row, run or dataset): bad input."""


def model_name(study: str, profile: str) -> str:
    """The default registered name of a search's best model."""
    return f"{study}-{profile}"


def trial_classifier_config(profile: ProfileConfig, config: dict, data) -> dict:
    """A trial's classifier config: the profile's backbone and seed (as ``trainable.build_model``
    builds them), the trial's LPT shape and loss scale, the data's class names and image size."""
    from tune.trial.setup import trial_settings

    model, recipe = trial_settings(profile, config)
    return classifier_config(
        profile.backbone.spec(),
        profile.seed,
        model,
        data.class_names,
        data.image_size,
        recipe.scale,
        data.input_cfg,
        profile.data.model_dump(),
        profile.shot_split,
    )


def version_tags(trial_id: str, parent_run_id: str, study: str, profile_name: str, val: dict, test: dict) -> dict:
    """The registered version's tags: trial, search, and the accuracies (``val_*``, ``test_*``, percent)."""
    tags = {VERSION_TRIAL: trial_id, VERSION_PARENT: parent_run_id, VERSION_STUDY: study, VERSION_PROFILE: profile_name}
    for prefix, values in (("val_", val), ("test_", test)):
        tags.update({prefix + k: f"{values[prefix + k]:.4f}" for k in SHOT_KEYS if prefix + k in values})
    return tags


def version_description(trial_id: str, val: dict, test: dict) -> str:
    get = lambda values, key: values.get(key, float("nan"))
    return (
        f"LPT prompts of trial {trial_id}: validation accuracy {get(val, 'val_acc'):.2f}%, test "
        f"{get(test, 'test_acc'):.2f}% (many {get(test, 'test_many_acc'):.2f} / medium "
        f"{get(test, 'test_medium_acc'):.2f} / few {get(test, 'test_few_acc'):.2f})"
    )


def register_best(
    uri: str,
    name: str,
    *,
    study: str,
    profile_name: str,
    profile: ProfileConfig,
    data,
    best: TrialRow,
    config: dict,
    prompt_file: str | Path | Location,
    test: dict,
    parent_run_id: str,
) -> str:
    """Log trial ``best`` (a trial-table row) as the LPT model on its run and register it as a new
    version of ``name``; tags the parent run; returns ``models:/NAME/VERSION``."""
    trial_id, run_id = best.trial_id, best.mlflow_run_id or ""
    val = {m: v for m, v in best.metrics().items() if math.isfinite(v)}  # the tags' edge: a metric dict
    client = MlflowClient(uri)
    try:
        stored = location(prompt_file)
        if not stored.is_file():
            raise RegisterError(f"{stored}: the trial's prompt file is missing")
        model_config = trial_classifier_config(profile, config, data)
        mlflow.set_tracking_uri(uri)
        tags = {
            names.ROLE: MODEL_RUN,
            names.TRIAL_ID: trial_id,
            TRIAL_RUN_TAG: run_id,
            VERSION_PARENT: parent_run_id,
            VERSION_STUDY: study,
            VERSION_PROFILE: profile_name,
        }
        experiment = mt.experiment_id(client, MODELS_EXPERIMENT, uri)
        with (
            mlflow.start_run(experiment_id=experiment, run_name=f"{study}-{trial_id}", tags=tags),
            stored.local_copy() as local,
        ):
            info = lpt_model.log_model(model_config, local, lpt_model.input_example(data))
        version = mlflow.register_model(
            info.model_uri, name, tags=version_tags(trial_id, parent_run_id, study, profile_name, val, test)
        )
        client.update_model_version(name, version.version, version_description(trial_id, val, test))
    except Exception as exc:  # the search's records stay; the parent run says why there is no model
        message = str(exc) if isinstance(exc, RegisterError) else f"registering {name}: {error_line(exc)}"
        mt.log(client, parent_run_id, tags={REGISTER_ERROR_TAG: message})
        raise RegisterError(message) from None
    model_uri = f"models:/{name}/{version.version}"
    mt.log(client, parent_run_id, tags={MODEL_URI_TAG: model_uri})
    return model_uri


def register_finished_search(client: MlflowClient, uri: str, parent, folder: Location, name: str | None) -> str:
    """``register_best`` for a search that has ended: its record, table and the best trial's
    logged test accuracy (the driver's wrap-up tags the parent run with ``lpt.best_trial_id``)."""
    from tune.config.loading import profile_data
    from tune.names import SEARCH_FILE, TABLE_FILE
    from tune.trial.table import prompt_path, read_rows

    record = load_record(folder)
    trial_id = parent.data.tags.get(names.BEST_TRIAL_ID)
    if not trial_id:
        raise NothingToRegister(
            f"run {parent.info.run_id}: no best trial recorded (tag lpt.best_trial_id): "
            f"the search did not finish or no trial completed"
        )
    best = read_rows(folder / TABLE_FILE).get(trial_id)
    if best is None:
        raise NothingToRegister(f"{folder / TABLE_FILE}: no row for the best trial {trial_id}")
    try:
        test = {k: v for k, v in client.get_run(best.mlflow_run_id or "").data.metrics.items() if k.startswith("test_")}
    except MlflowException:
        raise NothingToRegister(f"trial {trial_id}: its MLflow run {best.mlflow_run_id} is missing") from None
    try:
        data = profile_data(record.profile)
    except (ValueError, FileNotFoundError) as exc:
        raise NothingToRegister(f"{folder / SEARCH_FILE}: {exc}") from None
    name = name or model_name(record.study, record.profile_name)
    return register_best(
        uri,
        name,
        study=record.study,
        profile_name=record.profile_name,
        profile=record.profile,
        data=data,
        best=best,
        config={p: best.params[p] for p in record.study_config.space.params()},
        prompt_file=prompt_path(folder, trial_id),
        test=test,
        parent_run_id=parent.info.run_id,
    )


def register_and_print(client: MlflowClient, uri: str, parent, folder: Location, name: str | None) -> int:
    """``register_finished_search`` for a CLI (``tune/register.py``, ``tune/report.py --register``):
    prints ``model: models:/NAME/VERSION``; the exit code (bad input when there is nothing to register)."""
    from tune._cli import EXIT_BAD_INPUT, EXIT_FAILED, fail

    try:
        print(f"model: {register_finished_search(client, uri, parent, folder, name)}")
    except RegisterError as exc:
        return fail(exc, EXIT_BAD_INPUT if isinstance(exc, NothingToRegister) else EXIT_FAILED)
    return 0
