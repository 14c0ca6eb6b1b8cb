"""The registered model: the MLflow pyfunc model, its code file for models-from-code, and registration.
Never imports engine."""
