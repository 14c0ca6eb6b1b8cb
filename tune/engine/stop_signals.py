"""Ctrl+C (SIGINT) and ``docker stop`` (SIGTERM) on the driver stop a search as *interrupted*.

Ray Tune's own SIGINT handler ends ``Tuner.fit()`` normally, so a driver cannot tell an interrupted
search from a finished one. Here Tune's SIGINT handler is turned off and both signals go through
``StopSignals``: while ``fit`` runs, the first signal asks Tune to stop the way its handler would
(SIGUSR1: the trial loop ends, the experiment state is saved, trials keep their last epoch's
checkpoint) and records which signal came; outside ``fit``, or on a second signal, it raises
``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager for the driver's main thread; ``received`` names the first stop signal."""

    def __init__(self):
        self.received: str | None = None
        self.in_fit = False
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Tune still installs its SIGUSR1 stop
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def fit(self, tuner):
        """``tuner.fit()`` with a stop signal turned into Tune's graceful stop."""
        self.in_fit = True
        try:
            return tuner.fit()
        finally:
            self.in_fit = False

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        tune_listens = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if self.received or not self.in_fit or not tune_listens:
            self.received = self.received or name
            raise KeyboardInterrupt(name)
        self.received = name
        logging.getLogger("ray.tune").setLevel(logging.ERROR)  # its "Tuner.restore(...)" advice is not ours
        print(
            f"{name}: stopping the search; running trials keep their last epoch (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        signal.raise_signal(signal.SIGUSR1)
