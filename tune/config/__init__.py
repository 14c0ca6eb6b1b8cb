"""What a search is asked to do: the study and profile models, their loading, the search space,
samplers, early stopping, validation facts and the budget. Imports no Ray and no MLflow."""
