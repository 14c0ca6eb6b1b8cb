"""One-line renderings of accuracies by shot group, shared by the search summary, the reports and batch predict."""

from __future__ import annotations

import math

from tune.config.validation import binomial_se


def with_se(values: dict, val_images: int) -> str:
    """``87.00% ± 2.51 (1 SE, 180 images) (many 90.00 / medium 75.00 / few 50.00)``."""
    se = binomial_se(values.get("val_acc", math.nan), val_images)
    head, _, groups = shots(values, "val_", "{:.2f}", "%").partition(" (")
    return f"{head} ± {se:.2f} (1 SE, {val_images:,} images) ({groups}"


def shots(values: dict, prefix: str, fmt: str, unit: str) -> str:
    """``80.00% (many 90.00 / medium 75.00 / few 50.00)`` from ``values[prefix + key]``."""
    get = lambda k: values.get(f"{prefix}{k}", math.nan)
    return (
        f"{fmt.format(get('acc'))}{unit} (many {fmt.format(get('many_acc'))} / "
        f"medium {fmt.format(get('medium_acc'))} / few {fmt.format(get('few_acc'))})"
    )


def shot_line(values: dict, prefix: str) -> str:
    """``80.00% (many 90.00 / medium 75.00 / few 50.00)``."""
    return shots(values, prefix, "{:.2f}", "%")
