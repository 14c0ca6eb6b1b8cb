"""The search algorithm and the scheduler of a study, as Ray Tune takes them.

``make_searcher``: Optuna (the study's sampler, ``tune.config.samplers``) proposes configs through the
LPT space (``tune.config.search_space.DefineByRun``), at most ``concurrency`` at a time; its study lives
in the given Optuna storage. ``make_scheduler``: ASHA stops bad trials early, on enough evidence
(``SteadyASHA``), never the baseline trial. The benchmark ``benchmarks/search_quality.py`` uses the same two functions.
"""

from __future__ import annotations

import logging
import math

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from lpt_core.config import LPTConfig, PhaseConfig
from tune.config.early_stopping import grace_epochs
from tune.config.samplers import make_sampler
from tune.config.search_space import DefineByRun
from tune.config.study import StudyConfig
from tune.config.validation import binomial_se
from tune.engine.optuna_storage import requeue_unknown
from tune.names import OPTUNA_TRIAL_ID

logger = logging.getLogger(__name__)

BASELINE = "baseline"  # a constant of every config: True for the baseline trial


class LPTOptunaSearch(OptunaSearch):
    """Ray's ``OptunaSearch``, except that a trial ASHA stopped before its last epoch goes into
    the Optuna study as PRUNED (at its last reported value), not as COMPLETE: the sampler then
    ranks it below every trial that ran its epochs, and ``study.best_trials`` holds only those."""

    def __init__(self, *args, epochs: int, time_attr: str = "epoch", **kwargs):
        super().__init__(*args, **kwargs)
        self._epochs, self._time_attr = epochs, time_attr
        self._last_step: dict[str, int] = {}  # the last epoch reported to Optuna, by trial

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        if config is not None:
            self._ot_trials[trial_id].set_user_attr(OPTUNA_TRIAL_ID, trial_id)
        return config

    def restore(self, checkpoint_path: str) -> None:
        """``--resume``: the searcher as Tune's last snapshot saved it. A trial it asked Optuna for
        after that snapshot (the driver was killed in between) is in no Tune run: its Optuna
        trial goes back to the queue (``requeue_unknown``) for the next trial asked for."""
        super().restore(checkpoint_path)
        known = frozenset(t._trial_id for t in self._ot_trials.values())
        if orphans := requeue_unknown(self._ot_study, known):  # type: ignore[arg-type]
            print(f"Optuna: {orphans} trial(s) asked for after Tune's last snapshot queued again", flush=True)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list):  # Optuna keeps no intermediate values for several objectives
            return
        value, step = result.get(self.metric), int(result.get(self._time_attr, 0))
        if value is not None and trial_id not in self._completed_trials and step > self._last_step.get(trial_id, 0):
            self._ot_trials[trial_id].report(value, step)
            self._last_step[trial_id] = step

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ended = result and not error and trial_id not in self._completed_trials and not _nan(result, self.metric)
        if not ended or result is None:
            return super().on_trial_complete(trial_id, result, error)
        try:
            self.on_trial_result(trial_id, result)  # the last result reaches only this call: a point of its curve
            if result.get(self._time_attr, self._epochs) >= self._epochs:
                return super().on_trial_complete(trial_id, result, error)
            # ASHA stopped it (Ray types the study as optional; it is set once the searcher has a space)
            self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)  # type: ignore[attr-defined]
        except Exception as exc:  # as Ray's own: e.g. a trial a restored search had already told
            logger.warning(exc)
        self._completed_trials.add(trial_id)


def _nan(result: dict, metric) -> bool:
    values = [result.get(m) for m in (metric if isinstance(metric, list) else [metric])]
    return any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values)


class BaselineSpace(DefineByRun):
    """The LPT space, plus the ``baseline`` constant: True for the trial enqueued with the profile's
    own values (``enqueue_baseline``), so the scheduler, the table and the runs can tell it apart."""

    def __call__(self, trial: optuna.Trial) -> dict:  # type: ignore[override]
        super().__call__(trial)
        return {BASELINE: bool(trial.user_attrs.get(BASELINE, False))}


def enqueue_baseline(study: optuna.Study, config: dict) -> bool:
    """Queue the baseline (``search_space.baseline_config``) as the study's next trial, unless the
    study has it already (waiting, running or ended); True when queued."""
    had = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
    if any(t.user_attrs.get(BASELINE) for t in study.get_trials(deepcopy=False, states=had)):
        return False
    study.enqueue_trial(config, user_attrs={BASELINE: True})
    return True


def make_searcher(
    study_cfg: StudyConfig,
    model_defaults: LPTConfig,
    depth: int,
    epochs: int,
    metrics: list[str],
    modes: list[str],
    settings: dict,
    storage: optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    seed_offset: int = 0,
) -> ConcurrencyLimiter:
    """Optuna behind a ConcurrencyLimiter. ``settings``: ``tune.config.samplers.sampler_settings``."""
    single = len(metrics) == 1
    searcher = LPTOptunaSearch(
        space=BaselineSpace(study_cfg.space, model_defaults, depth),
        epochs=epochs,
        metric=metrics[0] if single else metrics,
        mode=modes[0] if single else modes,
        sampler=make_sampler(settings, seed_offset),
        storage=storage,
        study_name=study_name,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=study_cfg.budget.concurrency)


class SteadyASHA(ASHAScheduler):
    """Ray's ASHA (one bracket), except that a rung stops a trial only when it holds the results of
    at least ``min_trials`` other trials and the trial trails their cutoff by at least ``margin``
    points (``margin_se`` binomial standard errors of the validation accuracy at the cutoff, on
    ``val_images``; ``tune.config.early_stopping``). Ray 2.60's ``AsyncHyperBandScheduler`` has no
    such option: it stops a trial below the rung's percentile of whatever it has recorded, one
    other trial included. ``exempt_baseline``: ASHA compares every trial with the baseline's
    results but never stops the baseline."""

    def __init__(self, *, min_trials: int, margin_se: float, val_images: int | None, exempt_baseline: bool, **kwargs):
        super().__init__(**kwargs)
        self._min_trials, self._margin_se, self._val_images = min_trials, margin_se, val_images
        self._exempt_baseline = exempt_baseline

    def margin(self, cutoff: float) -> float:
        """Points a trial must trail ``cutoff`` by (0 when the validation size is not known)."""
        if not self._val_images:
            return 0.0
        return self._margin_se * binomial_se(abs(float(cutoff)), self._val_images)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        bracket = self._trial_info.get(trial.trial_id)
        before = [dict(recorded) for _, recorded in bracket._rungs] if bracket is not None else []
        action = super().on_trial_result(tune_controller, trial, result)
        if bracket is None or action != TrialScheduler.STOP or result.get(self._time_attr, 0) >= self._max_t:
            return action  # at its last epoch a trial ends anyway
        if self._exempt_baseline and trial.config.get(BASELINE):
            return TrialScheduler.CONTINUE
        for (_, recorded), others in zip(bracket._rungs, before):  # the rung that judged it just now
            if trial.trial_id in recorded and trial.trial_id not in others:
                cutoff = bracket.cutoff(others)
                value = self._metric_op * result[self._metric]
                if len(others) >= self._min_trials and cutoff is not None and value < cutoff - self.margin(cutoff):
                    return TrialScheduler.STOP
                break
        self._num_stopped -= 1  # Ray counted a stop that this rule overrides
        return TrialScheduler.CONTINUE


def make_scheduler(
    study_cfg: StudyConfig, phase2: PhaseConfig, metric: str, mode: str, val_images: int | None = None
) -> TrialScheduler:
    """ASHA with the study's grace period resolved against ``phase2`` and the search space
    (``tune.config.early_stopping``) and its stopping rule (``SteadyASHA``; ``val_images`` sizes
    the margin); FIFO (every trial runs its epochs) when early stopping is off or has no epoch to
    judge at."""
    es = study_cfg.early_stopping
    grace = grace_epochs(es, phase2, space=study_cfg.space)
    if grace is None:
        return FIFOScheduler()
    return SteadyASHA(
        time_attr="epoch",
        metric=metric,
        mode=mode,
        max_t=phase2.epochs,
        grace_period=grace,
        reduction_factor=es.reduction_factor,
        min_trials=es.min_trials,
        margin_se=es.margin_se,
        val_images=val_images,
        exempt_baseline=study_cfg.baseline.exempt_from_early_stopping,
    )
