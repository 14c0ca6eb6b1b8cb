"""What the three CLIs (search, report, predict) share: exit codes and the one-line error."""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2  # a bad study, profile, flag, file or name: nothing ran
EXIT_FAILED = 1  # a service, download or run that failed
EXIT_INTERRUPTED = 130  # Ctrl+C or SIGTERM: the search can be resumed


def fail(message: object, code: int = EXIT_FAILED) -> int:
    """Print ``error: <message>`` on stderr as one line and return the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code
