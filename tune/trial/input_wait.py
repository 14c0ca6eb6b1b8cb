"""Is a trial fed? Its ``input_wait_fraction`` (the share of each epoch's training time the step
waited for its batch, ``lpt_core.trainer``) against ``DATA_BOUND``, in words, with the knobs that
feed it faster: the trial's line, the search summary's line."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Protocol

from tune.config.input_capacity import knobs
from tune.config.study import ProfileConfig

METRIC = "input_wait_fraction"
# Above this share of the step time spent waiting for data, the accelerator idles for a fifth of
# the trial or more: more decoding capacity would shorten the trial by about that share.
DATA_BOUND = 0.2
BRIEF_KNOBS = "more loader workers, cpu per trial, or gpu_decode/gpu_augment"  # the summary names them in full


def is_data_bound(fraction: float | None) -> bool:
    return fraction is not None and math.isfinite(fraction) and fraction > DATA_BOUND


def trial_note(fraction: float | None) -> str:
    """``, input wait 35% (data-bound: ...)`` for a trial's line; empty without a figure."""
    if fraction is None or not math.isfinite(fraction):
        return ""
    note = f", input wait {fraction:.0%}"
    return note + (f" (data-bound, above {DATA_BOUND:.0%}: {BRIEF_KNOBS})" if is_data_bound(fraction) else "")


class _Waited(Protocol):  # a ``table.TrialRow`` (the table imports this module)
    trial_id: str
    input_wait_fraction: float


def summary_lines(rows: Sequence[_Waited], profile: ProfileConfig) -> list[str]:
    """The search summary's input-wait line: median and worst of the trials' last-epoch figures,
    and the knobs when the median trial is data-bound."""
    waits = [(r.input_wait_fraction, r.trial_id) for r in rows if math.isfinite(r.input_wait_fraction)]
    if not waits:
        return []
    median = statistics.median(w for w, _ in waits)
    worst, worst_id = max(waits)
    line = (
        f"input wait: median {median:.0%} of the step time over {len(waits)} trials (worst {worst:.0%}, "
        f"trial {worst_id}; data-bound above {DATA_BOUND:.0%})"
    )
    if is_data_bound(median):
        return [line, f"  the search was data-bound: {knobs(profile)}"]
    if is_data_bound(worst):
        return [line, f"  some trials were data-bound: {knobs(profile)}"]
    return [line]
