"""The progress line's best: the summary's rule (the last epoch of a completed trial); before any
trial completed, the peak at any epoch, labelled as such, which never gets worse."""

import pickle

from ray.tune.experiment import Trial

from tune.engine.progress import SearchProgress
from tune.trial.table import TrialRow


def test_the_peak_so_far_never_gets_worse():
    progress = SearchProgress(4, 3, "val_acc", "max", ["pool_size"])
    a, b = Trial("f", config={"pool_size": 8}, stub=True), Trial("f", config={"pool_size": 24}, stub=True)
    a.update_last_result({"val_acc": 80.0})
    b.update_last_result({"val_acc": 86.5})
    assert progress.peak([a, b]) == (86.5, {"pool_size": 24})
    b.update_last_result({"val_acc": 70.0})  # its next epoch reports less
    assert progress.peak([a, b]) == (86.5, {"pool_size": 24})
    restored = pickle.loads(pickle.dumps(progress))  # Tuner.restore keeps it
    assert restored.peak([a, b]) == (86.5, {"pool_size": 24}) and restored.started is None
    assert SearchProgress(4, 3, "val_acc", "min", ["pool_size"]).peak([a, b]) == (70.0, {"pool_size": 24})


def test_the_progress_best_is_the_summarys_best():
    """A stopped trial's earlier, higher epoch is a peak, not the best: the best is the last epoch of a
    trial that ran all its epochs, as ``table.best_row`` picks it for the summary."""
    progress = SearchProgress(4, 3, "val_acc", "max", ["pool_size"], interval_s=0)
    a, b, c = (Trial("f", config={"pool_size": n}, stub=True) for n in (8, 24, 40))
    a.update_last_result({"val_acc": 90.0, "epoch": 1})  # high at epoch 1, then stopped early by ASHA
    a.set_status(Trial.TERMINATED)
    b.update_last_result({"val_acc": 83.5, "epoch": 3})  # ran all 3 epochs
    b.set_status(Trial.TERMINATED)
    c.update_last_result({"val_acc": 88.0, "epoch": 2})  # still running
    c.set_status(Trial.RUNNING)
    assert progress.peak([a, b, c]) == (90.0, {"pool_size": 8})
    assert progress.best([a, b, c], {a.trial_id: 1, b.trial_id: 3, c.trial_id: 2}) == (83.5, {"pool_size": 24})
    line = progress.line([a, b, c], now=100.0)
    assert "best val_acc 83.50 of a completed trial (pool_size=24)" in line and "90.00" not in line
    # before any trial completed: the peak, labelled
    c.update_last_result({"val_acc": 88.0, "epoch": 3})
    fresh = SearchProgress(4, 3, "val_acc", "max", ["pool_size"], interval_s=0)
    assert "no trial completed; peak val_acc 90.00 at any epoch (pool_size=8)" in fresh.line([a, c], now=1.0)
    # the trial whose end Tune is reporting counts as completed; earlier runs' completed rows too
    ended = fresh.line([a, c], 2.0, {c.trial_id: "completed"})
    assert "best val_acc 88.00 of a completed trial (pool_size=40)" in ended
    prior = [
        TrialRow(trial_id="p1", status="completed", val_acc=95.0, params={"pool_size": 16}),
        TrialRow(trial_id="p2", status="early_stopped", val_acc=99.0),
    ]
    extended = SearchProgress(6, 3, "val_acc", "max", ["pool_size"], prior=prior, interval_s=0)
    assert "best val_acc 95.00 of a completed trial (pool_size=16)" in extended.line([a, c], now=1.0)


def test_callbacks_pickled_before_the_rows_and_profile_were_models_restore(tmp_path):
    """Tuner.restore of a search saved by the previous version: the progress line's earlier rows
    and the trial table's resources were dicts then."""
    from tune.config.study import Resources
    from tune.trial.table import TrialTable

    progress = SearchProgress(6, 4, "val_acc", "max", ["margin"])
    old_row = {"trial_id": "a", "status": "completed", "epochs": 4, "val_acc": 50.0, "margin": 0.1}
    restored = SearchProgress.__new__(SearchProgress)
    restored.__setstate__({**progress.__dict__, "prior": [old_row]})
    assert restored.prior == [("completed", 50.0, {"margin": 0.1})]
    table = TrialTable.__new__(TrialTable)
    table.__setstate__({"path": str(tmp_path / "trials.parquet"), "resources": {"cpu": 2, "gpu": 0.5}})
    assert table.resources == Resources(cpu=2, gpu=0.5) and table.rows == {}
