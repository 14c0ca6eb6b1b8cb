"""Errors the CLIs print as one line and exit 1 on: a service or cluster that cannot be used.

Kept apart from ``mlflow_tracking`` so that a command that fails before it needs MLflow (bad
input, missing weights or data) does not import it first.
"""


class ServiceError(RuntimeError):
    """A tracking or cluster address that cannot be used: the message is the CLI's one line."""
