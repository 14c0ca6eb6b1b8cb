"""The MLflow flavour of a trained LPT: a pyfunc model of a trial's prompts, logged on its run and
registered in the Model Registry.

The logged model holds the prompt file (a few MB), ``lpt_model.json`` (backbone spec, LPT shape,
class names, image size, normalisation, logit scale: ``lpt_core.inference.classifier_config``), a
signature and a PNG input example; never the backbone weights. The model itself is code, not a
pickle (``tune/serving/lpt_model_code.py``, MLflow's models-from-code): loading it unpickles nothing, and
works with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``. Loading builds the backbone from
timm (pretrained cache, a local file, or the seeded random one of a smoke profile) and the prompts.
``predict`` takes a DataFrame with an ``image`` column (encoded image bytes, as ``mlflow models
serve`` decodes them from base64, or file paths; uint8 [3, H, W] tensors too), a list of those, or a
batch tensor (through ``unwrap_python_model()``, which skips MLflow's DataFrame schema check), and
returns per image the ``class_index``, ``class_name`` and ``probability`` of its ``top_classes``
best classes (param, default 5). Load options (``model_config``): ``weights`` (a local backbone
weights file instead of the logged spec's) and ``device``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
import timm
import torch
import torchvision
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from lpt_core.inference import build_classifier, png_bytes, raw_split

ARTIFACT_PATH = "model"  # runs:/<trial run id>/model
CONFIG_FILE, PROMPTS_FILE = "lpt_model.json", "prompts.safetensors"
MODEL_CODE = Path(__file__).with_name("lpt_model_code.py")  # what MLflow runs to get the model
NO_PICKLES = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
DEFAULT_TOP_CLASSES = 5
IMAGE_COLUMN = "image"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]),
    outputs=Schema(
        [
            ColSpec(Array(DataType.long), "class_index"),
            ColSpec(Array(DataType.string), "class_name"),
            ColSpec(Array(DataType.double), "probability"),
        ]
    ),
    params=ParamSchema([ParamSpec("top_classes", DataType.long, DEFAULT_TOP_CLASSES)]),
)
LOAD_OPTIONS = {"device": "auto", "weights": ""}  # model_config at load: "" = the logged backbone spec's weights


class LoggedModelMismatch(RuntimeError):
    """The logged model, loaded back, does not answer as the trial's model does."""


class LPTModel(mlflow.pyfunc.PythonModel):
    """pyfunc model: the classifier is built in ``load_context`` from the logged artifacts."""

    def load_context(self, context) -> None:
        options = context.model_config or {}
        config = json.loads(Path(context.artifacts["config"]).read_text())
        try:
            self.classifier = build_classifier(
                config, context.artifacts["prompts"], options.get("weights") or None, options.get("device") or "auto"
            )
        except (ValueError, FileNotFoundError) as exc:
            raise MlflowException(str(exc)) from None

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        # (the DataFrame hint: MLflow then relies on the signature; a list or tensor also works unwrapped)
        images = model_input[IMAGE_COLUMN] if isinstance(model_input, pd.DataFrame) else model_input
        if isinstance(images, pd.Series):
            images = images.tolist()
        k = int((params or {}).get("top_classes", DEFAULT_TOP_CLASSES))
        try:
            rows = self.classifier.predict(images, k)
        except ValueError as exc:  # served: a 400 with this one line, not a 500 with a traceback
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return pd.DataFrame(rows, columns=["class_index", "class_name", "probability"])


def input_example(data) -> pd.DataFrame:
    """The first test image of the data, PNG-encoded, in the ``image`` column."""
    image, _ = raw_split(data.test)[0]
    return pd.DataFrame({IMAGE_COLUMN: [png_bytes(image)]})


def requirements() -> list[str]:
    """Pinned to what logged the model (given, so MLflow does not load the model to infer them).
    The LPT code itself comes from this project, installed where the model is loaded."""
    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"timm=={timm.__version__}",
        "safetensors",
        "pandas",
        "pillow",
    ]


def log_model(config: dict, prompt_file: str | Path, example: pd.DataFrame) -> mlflow.models.model.ModelInfo:
    """Log the pyfunc model on the active run under ``model``; checks that the logged model,
    loaded back, answers the example as the in-memory one does."""
    with tempfile.TemporaryDirectory() as folder:
        config_file, prompts = Path(folder) / CONFIG_FILE, Path(folder) / PROMPTS_FILE
        config_file.write_text(json.dumps(config, indent=2))
        shutil.copyfile(prompt_file, prompts)
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT_PATH,
            python_model=str(MODEL_CODE),
            artifacts={"config": str(config_file), "prompts": str(prompts)},
            model_config=LOAD_OPTIONS,
            signature=SIGNATURE,
            input_example=example,
            pip_requirements=requirements(),
        )
    expected = build_classifier(config, prompt_file, device="cpu").predict(example[IMAGE_COLUMN].tolist())
    got = load_model(info.model_uri, model_config={"device": "cpu"}).predict(example)
    if got["class_index"].tolist() != [r["class_index"] for r in expected]:
        raise LoggedModelMismatch(
            f"{info.model_uri}: the logged model, loaded back, does not reproduce "
            f"the trial's prediction on the input example"
        )
    return info


def load_model(uri: str, model_config: dict | None = None) -> mlflow.pyfunc.PyFuncModel:
    """``mlflow.pyfunc.load_model`` with unpickling refused whatever the environment says
    (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``): an LPT model is code, and a pickled model --
    one logged before models were code, or one replaced by someone who may write runs -- could run
    anything on this machine. MLflow refuses it with a one-line error."""
    previous = os.environ.get(NO_PICKLES)
    os.environ[NO_PICKLES] = "false"
    try:
        return mlflow.pyfunc.load_model(uri, model_config=model_config)
    finally:
        if previous is None:
            os.environ.pop(NO_PICKLES, None)
        else:
            os.environ[NO_PICKLES] = previous
