"""Errors the CLIs print as one line: bad input (``ConfigError``, exit 2) and a service or cluster
that cannot be used (``ServiceError``, exit 1).

Kept apart from ``tune.tracking`` so that a command that fails before it needs MLflow (bad input,
missing weights or data) does not import it first.
"""


class ServiceError(RuntimeError):
    """A tracking or cluster address that cannot be used: the message is the CLI's one line."""


class ConfigError(ValueError):
    """Bad study, profile or override: the message is the one line the CLI prints."""


def error_line(exc: BaseException) -> str:
    """An unexpected exception in one line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
