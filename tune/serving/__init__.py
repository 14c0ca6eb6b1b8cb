"""The registered model: the MLflow pyfunc model, its installed loader module, the check of a
downloaded model's layout, and registration. Never imports engine."""
