"""Figures of one trial, as artifacts of its MLflow run (PNG through matplotlib's Agg backend).

``log_trial_report`` (called by the trainable after the last epoch, before its final
``tune.report``) makes them from one pass of the final model over the validation split:

- ``per_class_accuracy.png``: per-class validation accuracy against train images per class (log x),
  the many / medium / few bands shaded and each band's accuracy drawn across it;
- ``shot_accuracy.png``: overall / many / medium / few accuracy of the final model against the
  phase-1 model it started from (read from the phase-1 MLflow run's last epoch);
- ``prompt_usage.png``: which group prompts the images of each class select (classes sorted by
  train frequency, rows normalised), with the pool's share per prompt on top; the normalised
  entropy of that share is logged as the metric ``prompt_usage_entropy`` (1: every prompt used
  equally, 0: one prompt takes everything);
- ``shot_confusion.png``: how often images of many / medium / few classes are predicted as a class
  of each group (row-normalised; the diagonal includes the correct predictions);
- ``val_diagnostics.json``: the numbers behind them.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lpt_core.trainer import predict_batches
from tune import names
from tune import tracking as mt
from tune.config.study import SHOT_KEYS
from tune.names import REPORT_DIR
from tune.plotting import log_report_error
from tune.trial.diagnostics import diagnostics, from_evaluation
from tune.trial.figures import write_trial_figures


# ============================================================================ per trial: numbers
def predict(model, loader, device: torch.device, batch_transform: Callable | None = None) -> dict:
    """Predicted class, label and (phase 2) selected prompt indices of every image of ``loader``,
    from the batches ``lpt_core.evaluate`` counts (``predict_batches``)."""
    preds, labels, idx = [], [], []
    for logits, y, aux in predict_batches(model, loader, device, batch_transform):
        preds.append(logits.argmax(dim=1))
        labels.append(y)
        if "prompt_idx" in aux:
            idx.append(aux["prompt_idx"])
    return {
        "preds": torch.cat(preds).cpu(),
        "labels": torch.cat(labels).cpu(),
        "prompt_idx": torch.cat(idx).cpu() if idx else None,
    }


def phase1_val_metrics(client, experiment_id: str, phase1_key: str) -> dict | None:
    """Validation shot accuracy of the phase-1 model: its MLflow run's last logged epoch."""
    run = mt.latest_run(client, experiment_id, **{names.ROLE: names.ROLE_PHASE1, names.PHASE1_KEY: phase1_key})
    if run is None:
        return None
    metrics = run.data.metrics
    found = {k: metrics[f"val_{k}"] for k in SHOT_KEYS if f"val_{k}" in metrics}
    return found or None


def log_trial_report(
    client, run_id: str, trainer, experiment_id: str, phase1_key: str, log: Callable[[str], None] = print
) -> dict:
    """Build the trial's figures from ``trainer``'s last validation pass (``last_eval``; one pass of its
    model where it ran no epoch) and log them to
    ``run_id`` under ``report/`` with ``prompt_usage_entropy`` and the extra parameter count.
    Best effort: a failure is logged as the tag ``lpt.report_error`` and never fails the trial."""
    try:
        started = time.perf_counter()
        model, data = trainer.model, trainer.data
        if trainer.last_eval is not None:  # the last epoch's validation pass, not a second one
            diag = from_evaluation(trainer.last_eval, trainer.shot_counts, trainer.shot_split)
        else:
            pred = predict(model, trainer.val_loader, trainer.device, data.eval_batch_transform)
            diag = diagnostics(pred, trainer.shot_counts, getattr(model, "pool_size", None), trainer.shot_split)
        phase1 = phase1_val_metrics(client, experiment_id, phase1_key)
        counts = model.parameter_counts()
        metrics = {"extra_params": counts["extra_params"], "extra_percent": counts["extra_percent"]}
        if diag.prompt_usage_entropy is not None:
            metrics.update(prompt_usage_entropy=diag.prompt_usage_entropy)
        with tempfile.TemporaryDirectory() as folder:
            write_trial_figures(
                diag, Path(folder), phase1, getattr(data, "class_names", None), f"epoch {trainer.epoch}"
            )
            client.log_artifacts(run_id, folder, REPORT_DIR)
        mt.log(client, run_id, metrics=metrics, step=trainer.epoch)
        log(f"report: validation figures logged ({time.perf_counter() - started:.1f} s)")
        return metrics
    except Exception as exc:  # figures are a convenience; the trial's result stands without them
        log_report_error(client, run_id, exc, "report: no validation figures", log)
        return {}
