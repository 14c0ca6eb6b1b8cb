"""The MLflow flavour of a trained LPT: a pyfunc model of a trial's prompts, logged on its run and
registered in the Model Registry.

The logged model holds the prompt file (a few MB), ``lpt_model.json`` (backbone spec, LPT shape,
class names, image size, normalisation, logit scale: ``lpt_core.inference.classifier_config``), a
signature and a PNG input example; never the backbone weights, never code and never a pickle:
the MLmodel names the installed loader module ``tune.serving.loader`` (MLflow's ``loader_module``),
which builds ``LPTModel`` from this project's code and the logged files. ``load_model`` (every load
path of the project) downloads the model and checks its layout first (``tune.serving.check``): a
code file or another loader in the artifacts is refused in one line. Loading builds the backbone from
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
from mlflow.pyfunc import PyFuncModel
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

from lpt_core.inference import build_classifier, png_bytes, raw_split
from tune.serving.check import CONFIG_FILE, DATA, LOADER, PROMPTS_FILE, fetch

ARTIFACT_PATH = "model"  # runs:/<trial run id>/model
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


class LPTModel:
    """The LPT pyfunc model (``unwrap_python_model()``): its ``classifier`` is built by ``build``
    from the logged files; ``tune.serving.loader`` hands it to MLflow."""

    def __init__(self, classifier):
        self.classifier = classifier

    @classmethod
    def build(cls, config_file: Path, prompt_file: Path, options: dict) -> LPTModel:
        config = json.loads(Path(config_file).read_text())
        weights, device = options.get("weights") or None, options.get("device") or "auto"
        try:
            return cls(build_classifier(config, prompt_file, weights, device))
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
        data = Path(folder) / Path(DATA).name  # MLflow copies it to <model>/data/lpt
        data.mkdir()
        (data / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        shutil.copyfile(prompt_file, data / PROMPTS_FILE)
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT_PATH,
            loader_module=LOADER,
            data_path=str(data),
            model_config=LOAD_OPTIONS,
            signature=SIGNATURE,
            input_example=example,
            pip_requirements=requirements(),
        )
    expected = build_classifier(config, prompt_file, device="cpu").predict(example[IMAGE_COLUMN].tolist())
    got = pd.DataFrame(load_model(info.model_uri, model_config={"device": "cpu"}).predict(example))
    if got["class_index"].tolist() != [r["class_index"] for r in expected]:
        raise LoggedModelMismatch(
            f"{info.model_uri}: the logged model, loaded back, does not reproduce "
            f"the trial's prediction on the input example"
        )
    return info


def load_model(uri: str, model_config: dict | None = None) -> PyFuncModel:
    """Download the model, check its layout (``tune.serving.check``: refused with ``ModelRefused``,
    one line naming the file) and load the checked copy, so what MLflow reads is what was checked."""
    with tempfile.TemporaryDirectory(prefix="lpt-model-") as folder:
        return mlflow.pyfunc.load_model(str(fetch(uri, folder)), model_config=model_config)
