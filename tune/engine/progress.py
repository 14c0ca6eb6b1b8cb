"""One plain progress line for the whole search, at each trial event and at least every 30 s.

``done/budget`` (completed, stopped early, failed), running (and how many have reported no phase-2
epoch yet: starting, or training or waiting for phase 1), pending (and, once a cost budget has no
room for another trial, how many it will not start), the best objective so far with
its parameters by the summary's rule (the last epoch of a trial that ran all its epochs; before one
has, the peak at any epoch, labelled as such), the hours spent (``GPU-hours 3.2 of 10`` with a
budget: ``budget.BudgetMeter``),
the elapsed time and an estimate of the time left from the phase-2 epochs finished so far (an
upper bound: ASHA stops some trials before their last epoch). Plain lines, so that logs and
``docker logs`` read well.
"""

from __future__ import annotations

import math
import os
import time

from ray import tune
from ray.tune.experiment import Trial

from tune.trial.table import TrialRow

INTERVAL_S = float(os.environ.get("LPT_PROGRESS_S", "30"))


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class SearchProgress(tune.Callback):
    def __init__(
        self,
        budget: int,
        epochs: int,
        metric: str,
        mode: str,
        params: list[str],
        prior: list[TrialRow] | tuple[()] = (),
        interval_s: float = INTERVAL_S,
        meter=None,
    ):
        """``budget``: trials of the whole search; ``prior``: table rows of its earlier Tune runs;
        ``meter``: a ``budget.BudgetMeter`` (the hours spent), or None."""
        self.budget, self.epochs, self.metric, self.mode, self.params = budget, epochs, metric, mode, params
        # (status, objective value, config) of each earlier row: pickled with the callback (Tuner.restore)
        self.prior = self._digest(prior)
        self.interval_s, self.meter = interval_s, meter
        self.started: float | None = None
        self.last: float | None = None
        self.epochs_at_start: int | None = None  # a resumed search: epochs that ran before this driver
        self.best_seen: tuple[float, dict] | None = None

    def _digest(self, prior) -> list[tuple[str, float, dict]]:
        return [(r.status, r.metric(self.metric), {p: r.params.get(p) for p in self.params}) for r in prior]

    def __setstate__(self, state: dict) -> None:  # Tuner.restore: this driver's clock starts again
        self.__dict__.update({"best_seen": None, "meter": None, **state}, started=None, last=None, epochs_at_start=None)
        if self.prior and isinstance(self.prior[0], dict):  # pickled before rows were TrialRows
            self.prior = self._digest(TrialRow.from_columns(r) for r in self.prior)

    # ----------------------------------------------------------------------------- the line
    def line(self, trials: list[Trial], now: float | None = None, ending: dict | None = None) -> str:
        """``ending``: {trial_id: "completed" | "failed"} of trials whose end Tune is reporting
        (their status changes only after the callbacks ran)."""
        now = time.time() if now is None else now
        ending = ending or {}
        self.started = self.started or now
        epochs_of = {t.trial_id: int((t.last_result or {}).get("epoch", 0) or 0) for t in trials}
        running = [t for t in trials if t.status == Trial.RUNNING and t.trial_id not in ending]
        ended = [
            self.outcome(t, epochs_of[t.trial_id], ending.get(t.trial_id))
            for t in trials
            if t.status in (Trial.TERMINATED, Trial.ERROR) or t.trial_id in ending
        ]
        ended += [status if status in ("completed", "failed") else "stopped" for status, _, _ in self.prior]
        completed, stopped, failed = (ended.count(k) for k in ("completed", "stopped", "failed"))
        cost = self.meter.text(trials, now) if self.meter is not None else None  # brings its ledger up to date
        pending = max(0, self.budget - len(ended) - len(running))
        # a cost budget with no room for one more trial starts none of them (BudgetSearcher)
        held = pending if self.meter is not None and not self.meter.ledger.allows_new_trial(now) else 0
        pending -= held
        no_epoch = sum(epochs_of[t.trial_id] == 0 for t in running)
        parts = [
            f"[search {duration(now - self.started)}] {len(ended)}/{self.budget} done "
            f"({completed} completed, {stopped} stopped early, {failed} failed), "
            f"{len(running)} running"
            + (f" ({no_epoch} before their first epoch)" if no_epoch else "")
            + f", {pending} pending"
            + (f", {held} the cost budget will not start" if held else "")
        ]
        best, peak = self.best(trials, epochs_of, ending), self.peak(trials)
        shown = lambda config: ", ".join(f"{p}={config.get(p)}" for p in self.params)
        if best is not None:  # the summary's rule (table.best_row)
            parts.append(f"best {self.metric} {best[0]:.2f} of a completed trial ({shown(best[1])})")
        elif peak is not None:
            parts.append(f"no trial completed; peak {self.metric} {peak[0]:.2f} at any epoch ({shown(peak[1])})")
        if cost:
            parts.append(cost)
        left = self.time_left(trials, epochs_of, pending, now)
        if left is not None:
            parts.append(f"about {duration(left)} left at most")
        return "; ".join(parts)

    def outcome(self, trial: Trial, epochs: int, ending: str | None = None) -> str:
        if ending == "failed" or trial.status == Trial.ERROR or (trial.last_result or {}).get("error"):
            return "failed"
        return "completed" if epochs >= self.epochs else "stopped"

    def best(self, trials: list[Trial], epochs_of: dict, ending: dict | None = None) -> tuple[float, dict] | None:
        """The summary's best (``tune.trial.table.best_row``): the best last value of a trial that
        ran all its epochs (this run's and ``prior``'s), with its config; None before one has."""
        sign, ending = (1 if self.mode == "max" else -1), ending or {}
        done = [
            ((t.last_result or {}).get(self.metric), t.config)
            for t in trials
            if (t.status == Trial.TERMINATED or t.trial_id in ending)
            and self.outcome(t, epochs_of.get(t.trial_id, 0), ending.get(t.trial_id)) == "completed"
        ]
        done += [(value, config) for status, value, config in self.prior if status == "completed"]
        scored = [(float(v), c) for v, c in done if isinstance(v, (int, float)) and math.isfinite(v)]
        return max(scored, key=lambda s: sign * s[0]) if scored else None

    def peak(self, trials: list[Trial]) -> tuple[float, dict] | None:
        """The highest objective value reported so far at any epoch of any trial (stopped ones
        included) and its trial's config: shown, labelled as a peak, only before a trial has
        completed. It never gets worse: a trial's later epoch may report less than an earlier one did."""
        sign = 1 if self.mode == "max" else -1
        seen = [((t.last_result or {}).get(self.metric), t.config) for t in trials]
        seen += [(value, config) for _, value, config in self.prior]
        scored = [(float(v), c) for v, c in seen if isinstance(v, (int, float)) and math.isfinite(v)]
        scored += [self.best_seen] if self.best_seen else []
        self.best_seen = max(scored, key=lambda s: sign * s[0]) if scored else None
        return self.best_seen

    def time_left(self, trials: list[Trial], epochs_of: dict, pending: int, now: float) -> float | None:
        done = sum(epochs_of.values())
        if self.epochs_at_start is None:
            self.epochs_at_start = done
        ran = done - self.epochs_at_start
        if ran <= 0:
            return None
        remaining = pending * self.epochs + sum(
            max(0, self.epochs - epochs_of[t.trial_id]) for t in trials if t.status == Trial.RUNNING
        )
        return remaining * (now - (self.started or now)) / ran  # line() sets started first

    # ----------------------------------------------------------------------------- Tune's hooks
    def _show(self, trials: list[Trial], ending: dict | None = None) -> None:
        self.last = time.time()
        print(self.line(trials, self.last, ending), flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._show(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._show(trials, {trial.trial_id: "completed"})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._show(trials, {trial.trial_id: "failed"})

    def on_step_end(self, iteration, trials, **info):
        if self.last is None or time.time() - self.last >= self.interval_s:
            self._show(trials)
