"""The cost budget's pieces in a Ray Tune run; each asks ``tune.engine.budget_ledger.SpendLedger``,
the one place that says what the search has spent (the plan and the limit: ``tune.config.budget``).

``BudgetSearcher`` wraps the search's searcher and keeps trials from starting, ``BudgetStopper``
stops running ones (``on_exhausted: stop``), ``BudgetMeter`` gives the progress line its figure.
Each reads the search folder when it starts and again when Tune restores it (``--resume``), so a
resumed search counts everything spent before and runs with the budget its command gives.
"""

from __future__ import annotations

import time

from ray.tune import Stopper
from ray.tune.experiment import Trial
from ray.tune.search import Searcher
from ray.tune.search.util import _set_search_properties_backwards_compatible

from tune.config.budget import MEASURES, fmt
from tune.engine.budget_ledger import SpendLedger
from tune.storage import Location


class BudgetSearcher(Searcher):
    """Wraps the search's searcher: asked for a trial while the budget has no room for one more,
    it answers "not now" while trials run (their end may make room) and "finished" when none do.
    ``held_back``: the budget has kept a trial from starting."""

    def __init__(self, searcher: Searcher, folder: str | Location):
        self.searcher = searcher
        self.folder = str(folder)
        self.ledger = SpendLedger(folder)
        self.live: set[str] = set()
        self.held_back = False
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return _set_search_properties_backwards_compatible(
            self.searcher.set_search_properties, metric, mode, config, **spec
        )

    def suggest(self, trial_id: str):
        if not self.ledger.allows_new_trial():
            self.held_back = True
            return Searcher.FINISHED if not self.live else None
        config = self.searcher.suggest(trial_id)
        if config not in (None, Searcher.FINISHED):
            self.live.add(trial_id)
            self.ledger.observe(trial_id, None)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.ledger.observe(trial_id, result)
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.ledger.observe(trial_id, result, ended=True)
        self.live.discard(trial_id)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def add_evaluated_point(self, *args, **kwargs):
        return self.searcher.add_evaluated_point(*args, **kwargs)

    def get_state(self) -> dict:
        return {"live": sorted(self.live), "held_back": self.held_back, "ledger": self.ledger.state()}

    def set_state(self, state: dict) -> None:
        """Tune restoring the search: the budget as the folder has it now (``--resume`` may raise
        it), plus what this run had seen."""
        self.live, self.held_back = set(state["live"]), state["held_back"]
        self.ledger = SpendLedger(self.folder)
        self.ledger.restore(state["ledger"])


class BudgetStopper(Stopper):
    """``on_exhausted: stop``: once the hours are spent, every running trial stops at its next
    result (its epoch is kept). ``stopped``: the trials it stopped (the table's ``budget_stopped``)."""

    def __init__(self, folder: str | Location):
        self.folder = str(folder)
        self.ledger = SpendLedger(folder)
        self.stopped: set[str] = set()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.ledger = SpendLedger(self.folder)

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.ledger.observe(trial_id, result)
        limit = self.ledger.limit
        if limit is not None and limit.on_exhausted == "stop" and self.ledger.exhausted():
            self.stopped.add(trial_id)
            return True
        return False

    def stop_all(self) -> bool:
        return False


class BudgetMeter:
    """The progress line's figure: ``GPU-hours 3.2 of 10`` (with a budget), ``GPU-hours 3.2``
    (GPU trials without one), nothing for CPU trials without one."""

    def __init__(self, folder: str | Location):
        self.folder = str(folder)
        self.ledger = SpendLedger(folder)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.ledger = SpendLedger(self.folder)

    def text(self, trials, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        for t in trials:
            self.ledger.observe(t.trial_id, t.last_result, ended=t.status in (Trial.TERMINATED, Trial.ERROR), now=now)
        ledger, limit = self.ledger, self.ledger.limit
        label = MEASURES[ledger.measure][1]
        if limit is None:
            return f"{label} {fmt(ledger.spent(now))}" if ledger.measure == "gpu_hours" else None
        full = "" if ledger.allows_new_trial(now) else " (no room for another trial)"
        return f"{label} {fmt(ledger.spent(now))} of {fmt(limit.hours)}{full}"
