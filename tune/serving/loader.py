"""The loader module an LPT model's MLmodel names (pyfunc ``loader_module``): MLflow imports this
installed module and calls ``_load_pyfunc(data_path, model_config)``.

The model folder is checked first (``tune.serving.check``: no code file, no other loader), then
``LPTModel`` is built from this project's code, the logged prompt file and ``lpt_model.json``.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException

from tune.serving.check import CONFIG_FILE, PROMPTS_FILE, ModelRefused, check_model_dir


class PyfuncModel:
    """What MLflow's ``PyFuncModel`` wraps: ``predict`` and, for ``unwrap_python_model()``, the
    ``LPTModel`` (``.classifier``)."""

    def __init__(self, python_model):
        self.python_model = python_model

    def predict(self, model_input, params: dict | None = None):
        return self.python_model.predict(None, model_input, params)


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> PyfuncModel:
    from tune.serving.model import LPTModel

    data = Path(data_path)
    try:
        check_model_dir(data.parent.parent)  # <model>/data/lpt
    except ModelRefused as exc:
        raise MlflowException(str(exc)) from None
    return PyfuncModel(LPTModel.build(data / CONFIG_FILE, data / PROMPTS_FILE, model_config or {}))
