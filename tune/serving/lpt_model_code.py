"""The LPT pyfunc model as MLflow stores it: this file, not a pickle (MLflow "models from code").

``tune/serving/model.py`` logs this file as the model's ``python_model``; MLflow copies it into the
model and runs it wherever the model is loaded, and ``set_model`` hands it the model object, whose
classifier ``load_context`` builds from the logged artifacts (the prompts and ``lpt_model.json``).
Nothing is unpickled, so loading needs no ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``; the class comes
from this project, installed where the model is loaded.
"""

from mlflow.models import set_model

from tune.serving.model import LPTModel

set_model(LPTModel())
