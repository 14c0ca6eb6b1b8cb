"""The driver's MLflow calls during a search never end it: each goes through ``TrackingGuard.attempt``,
which lets MLflow's client retry (``tune.tracking_retry``), and when that gives up records what
failed (which trial, which call, the error's first line) and goes on.

One guard per search folder and driver process (``for_search``): the trial-table callback (also
when Tune unpickles it on ``--resume``) and the wrap-up share its list, so the summary and the
parent run's ``lpt.tracking_failures`` tag name everything that lost its tracking. After a failure
the next call first asks the server's ``/health`` (5 s): while it does not answer, the call is
recorded as skipped at once instead of waiting out another retry window per call.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import requests
from mlflow.exceptions import MlflowException

from tune.errors import ServiceError, error_line
from tune.storage import Location, location
from tune.tracking import check_tracking_uri

T = TypeVar("T")
TRACKING_ERRORS = (MlflowException, requests.RequestException, ServiceError, OSError)
SHOWN = 10  # failures listed in the summary (all of them in the tag, up to MLflow's 6000 characters)
_GUARDS: dict[str, TrackingGuard] = {}


@dataclass(frozen=True)
class TrackingFailure:
    """One MLflow call that failed: whose (a trial id, or "search" for the parent run), which call,
    and the error's first line; ``lpt.tracking_failures`` holds them as JSON objects."""

    trial: str
    call: str
    error: str


class TrackingGuard:
    def __init__(self, uri: str):
        self.uri = uri
        self.failures: list[TrackingFailure] = []
        self.down = False

    def attempt(self, what: str, fn: Callable[..., T], *args: Any, trial: str | None = None, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)``, or None when MLflow could not be reached or refused it: then
        ``what`` (the call: "close run", "summary metrics" ...) of ``trial`` (None: the search's
        parent run) is recorded with the error's first line and one line is printed."""
        if self.down:
            try:
                check_tracking_uri(self.uri, timeout_s=5)
            except ServiceError as exc:
                self._record(what, trial, exc, skipped=True)
                return None
            self.down = False
        try:
            return fn(*args, **kwargs)
        except TRACKING_ERRORS as exc:
            self.down = True
            self._record(what, trial, exc)
            return None

    def _record(self, what: str, trial: str | None, exc: BaseException, skipped: bool = False) -> None:
        line = error_line(exc)[:300]
        self.failures.append(TrackingFailure(trial or "search", what, line))
        where = f"trial {trial}" if trial else "the search's parent run"
        print(
            f"warning: MLflow: {what} of {where} {'skipped, the server is still down' if skipped else 'failed'} "
            f"({line}); the search goes on",
            flush=True,
        )

    def summary_lines(self, closed_later: Sequence[str] = ()) -> list[str]:
        """The summary's lines about what lost its tracking (none when nothing did); ``closed_later``:
        the trials whose runs the wrap-up closed (MLflow back, or left open by an earlier driver)."""
        if not self.failures:  # runs an earlier driver left open, closed at this one's wrap-up
            left = (
                f"tracking: closed at the wrap-up the runs an earlier driver left open: trial {', '.join(closed_later)}"
            )
            return [left] if closed_later else []
        owners = sorted({f.trial for f in self.failures}, key=lambda t: (t != "search", t))
        named = ["the search's parent run" if t == "search" else f"trial {t}" for t in owners]
        lines = [f"tracking: {len(self.failures)} MLflow calls failed; lost their tracking: {', '.join(named)}"]
        lines += [f"  {f.trial}: {f.call}: {f.error}" for f in self.failures[:SHOWN]]
        if len(self.failures) > SHOWN:
            lines.append(f"  ... and {len(self.failures) - SHOWN} more")
        if closed_later:
            lines.append(f"  closed at the wrap-up, MLflow back: the runs of trial {', '.join(closed_later)}")
        return lines

    def tag_value(self) -> str:
        """``lpt.tracking_failures``: the failures as JSON, cut to fit MLflow's tag limit."""
        records = [asdict(f) for f in self.failures]
        text = json.dumps(records)
        if len(text) <= 6000:
            return text
        return json.dumps(records[: max(1, len(records) * 5000 // len(text))])[:6000]


def for_search(folder: str | os.PathLike | Location, uri: str) -> TrackingGuard:
    """The guard of the search in ``folder`` in this process (made on first use)."""
    key = location(folder).uri
    guard = _GUARDS.get(key)
    if guard is None or guard.uri != uri:
        guard = _GUARDS[key] = TrackingGuard(uri)
    return guard
