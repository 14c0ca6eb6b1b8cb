"""The progress line's best value: the best reported so far, which never gets worse."""

import pickle

from ray.tune.experiment import Trial

from tune.engine.progress import SearchProgress


def test_the_best_so_far_never_gets_worse():
    progress = SearchProgress(4, 3, "val_acc", "max", ["pool_size"])
    a, b = Trial("f", config={"pool_size": 8}, stub=True), Trial("f", config={"pool_size": 24}, stub=True)
    a.update_last_result({"val_acc": 80.0})
    b.update_last_result({"val_acc": 86.5})
    assert progress.best([a, b]) == (86.5, {"pool_size": 24})
    b.update_last_result({"val_acc": 70.0})  # its next epoch reports less
    assert progress.best([a, b]) == (86.5, {"pool_size": 24})
    restored = pickle.loads(pickle.dumps(progress))  # Tuner.restore keeps it
    assert restored.best([a, b]) == (86.5, {"pool_size": 24}) and restored.started is None
    assert SearchProgress(4, 3, "val_acc", "min", ["pool_size"]).best([a, b]) == (70.0, {"pool_size": 24})
