"""One pass over the test split: the accuracies by shot group and, per image, whether the model got
it right (in the split's own order), so that two models' test predictions can be paired image by
image (``tune.engine.confirmation``: the test set's own paired standard error)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lpt_core import LPT
from lpt_core.metrics import confusion_counts, shot_accuracy
from lpt_core.trainer import make_loader, predict_batches, resolve_device
from tune.config.study import SHOT_KEYS, ProfileConfig
from tune.trial.setup import trial_device

TEST_KEYS = tuple(f"test_{k}" for k in SHOT_KEYS)


@dataclass(frozen=True)
class SeedScores:
    """One test pass: ``test`` the accuracies by shot key (``acc``, ``many_acc``, ...; percent),
    ``correct`` (bool per test image) and ``labels`` (int per test image), in the split's order."""

    test: dict[str, float]
    correct: np.ndarray
    labels: np.ndarray

    def as_dict(self) -> dict:
        """``test_acc``, ``test_many_acc``, ..., ``correct`` and ``labels``: ``score_test``'s dict."""
        return {**{f"test_{k}": self.test[k] for k in SHOT_KEYS}, "correct": self.correct, "labels": self.labels}


def score_test(profile: ProfileConfig, model: LPT, data) -> dict:
    """``scored_test`` as a dict: ``test_acc``, ``test_many_acc``, ... (percent, as
    ``lpt_core.evaluate`` counts them),
    ``correct`` (bool per test image) and ``labels`` (int per test image), in the test split's
    order (the loader does not shuffle)."""
    return scored_test(profile, model, data).as_dict()


def scored_test(profile: ProfileConfig, model: LPT, data) -> SeedScores:
    """The test split once: the accuracies by shot group and each image's outcome (``SeedScores``)."""
    device = resolve_device(trial_device(profile.device))
    model.set_phase(2)
    model.to(device)
    loader = make_loader(data.test, device, profile.loader.num_workers, batch_size=profile.loader.eval_batch_size)
    c = model.num_classes
    correct = torch.zeros(c, dtype=torch.long, device=device)
    total = torch.zeros(c, dtype=torch.long, device=device)
    hits, labels = [], []
    for logits, y, _ in predict_batches(model, loader, device, data.eval_batch_transform):
        preds = logits.argmax(dim=1)
        ok, n = confusion_counts(preds, y, c)
        correct += ok
        total += n
        hits.append((preds == y).cpu())
        labels.append(y.cpu())
    acc = shot_accuracy(correct, total, data.shot_counts, profile.shot_split)  # as evaluate counts the test split
    return SeedScores(
        {k: acc[k] for k in SHOT_KEYS},
        torch.cat(hits).numpy().astype(bool),
        torch.cat(labels).numpy().astype(np.int64),
    )
