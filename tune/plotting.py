"""What the trial and search reports share: headless pyplot, saving a figure, and recording why a
report could not be made (as a log line and the run's tag ``lpt.report_error``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from tune import tracking as mt
from tune.names import REPORT_ERROR


def pyplot():
    """pyplot on the Agg backend (headless), imported on first use: trials import the reports."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def log_report_error(client, run_id: str, exc: Exception, what: str, log: Callable[[str], None]) -> None:
    """Say why a report could not be made, in the log and as the run's tag ``lpt.report_error``."""
    reason = f"{type(exc).__name__}: {exc}"[:2000]
    log(f"{what} ({reason})")
    try:
        mt.log(client, run_id, tags={REPORT_ERROR: reason})
    except Exception:  # the tracking server may be what failed
        pass
