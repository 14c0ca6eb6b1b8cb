"""Long-tailed datasets: ``build_dataset(spec)`` returns an ``LTData`` with train/val/test splits."""

from __future__ import annotations

from .base import LTData
from .profile import long_tail_counts
from .synthetic import build_synthetic

BUILDERS = {"synthetic": build_synthetic}


def build_dataset(spec: dict) -> LTData:
    """Build the dataset named by ``spec["name"]`` (see DESIGN.md for each name's keys)."""
    name = spec.get("name")
    if name not in BUILDERS:
        raise ValueError(f"data.name: unknown dataset '{name}' (known: {', '.join(sorted(BUILDERS))})")
    return BUILDERS[name](spec)


__all__ = ["LTData", "build_dataset", "long_tail_counts", "BUILDERS"]
