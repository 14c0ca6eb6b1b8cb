"""Long-tailed datasets: ``build_dataset(spec)`` returns an ``LTData`` with train/val/test splits.

Every spec takes ``name``, ``seed`` (0) and ``image_size`` (224; synthetic 32); the other keys
per name are in each builder's docstring and DESIGN.md. An unknown key, a bad value, a missing
or malformed file raise ValueError / FileNotFoundError with one line naming the key or file.
"""

from __future__ import annotations

from .base import DownloadError, LTData
from .batch import BatchTransform, EncodedBatch, collate_encoded
from .cifar import build_cifar_lt
from .filesets import build_image_folder, build_inat, build_list_dataset
from .manifest import build_manifest, manifest_hash, write_manifest
from .profile import long_tail_counts
from .synthetic import build_synthetic

BUILDERS = {
    "synthetic": build_synthetic,
    "cifar10_lt": build_cifar_lt,
    "cifar100_lt": build_cifar_lt,
    "places_lt": build_list_dataset,
    "imagenet_lt": build_list_dataset,
    "inat2018": build_inat,
    "image_folder": build_image_folder,
}


def build_dataset(spec: dict) -> LTData:
    """Build the dataset named by ``spec["name"]`` (see DESIGN.md for each name's keys)."""
    if not isinstance(spec, dict):
        raise ValueError(f"data: expected a mapping, got {type(spec).__name__}")
    name = spec.get("name")
    if name not in BUILDERS:
        raise ValueError(f"data.name: unknown dataset '{name}' (known: {', '.join(sorted(BUILDERS))})")
    return BUILDERS[name](spec)


__all__ = ["LTData", "DownloadError", "build_dataset", "long_tail_counts", "BUILDERS", "BatchTransform",
           "EncodedBatch", "collate_encoded", "build_manifest", "manifest_hash", "write_manifest"]
