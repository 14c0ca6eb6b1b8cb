"""The test-exposure ledger: every trial whose config a search has evaluated on the test split.

The test split is an unbiased estimate only for a config chosen without it. Each wrap-up (an
extension's included) evaluates the current best on test, and ``--confirm`` tests the best and the
baseline again with fresh seeds; once several configs have been seen on test, a reader who picks
among them by their test numbers is selecting on test. So the parent run keeps the ledger (tag
``lpt.test_exposed``: the trial ids in the order they were first tested; metric
``test_configs_seen``: how many), every test number the search prints names that count, and a
wrap-up that is about to test a new best says so.
"""

from __future__ import annotations

from mlflow import MlflowClient

from tune import names
from tune import tracking as mt

COUNT_METRIC = "test_configs_seen"


def exposed(tags: dict) -> list[str]:
    """The trial ids the parent run's ledger holds, first tested first."""
    return [t for t in tags.get(names.TEST_EXPOSED, "").split(",") if t]


def expose(client: MlflowClient, parent_id: str, trial_ids: list[str]) -> list[str]:
    """Add ``trial_ids`` to the parent run's ledger (kept across ``--resume`` and ``--confirm``:
    the ledger is read back from the run each time); returns the whole ledger."""
    ledger = exposed(client.get_run(parent_id).data.tags)
    ledger += [t for t in dict.fromkeys(trial_ids) if t not in ledger]
    mt.log(client, parent_id, metrics={COUNT_METRIC: len(ledger)}, tags={names.TEST_EXPOSED: ",".join(ledger)})
    return ledger


def seen(ledger: list[str]) -> str:
    """``the test split has seen 3 configs of this search (a, b, c)``."""
    n = len(ledger)
    shown = ", ".join(ledger[:8]) + (f" and {n - 8} more" if n > 8 else "")
    return f"the test split has seen {n} config{'s' * (n != 1)} of this search ({shown})"


def new_best_line(ledger: list[str], best_id: str) -> str | None:
    """Said before a wrap-up tests a best that the ledger does not hold, when it holds others."""
    if not ledger or best_id in ledger:
        return None
    return (
        f"  test exposure: {best_id} is a new best; testing it makes {len(ledger) + 1} configs seen on test "
        f"(before: {', '.join(ledger[:8])}{' ...' if len(ledger) > 8 else ''}): compare them on validation, "
        f"never by their test numbers"
    )
