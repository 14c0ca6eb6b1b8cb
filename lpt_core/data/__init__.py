"""Long-tailed datasets: ``build_dataset(spec)`` returns an ``LTData`` with train/val/test splits.

Every spec takes ``name``, ``seed`` (0) and ``image_size`` (224; synthetic 32); the other keys
per name are the typed models of ``specs`` (and docs/design.md). An unknown key, a bad value, a
missing or malformed file raise ValueError / FileNotFoundError with one line naming the key or file.
"""

from __future__ import annotations

from .base import DownloadError, LTData
from .batch import BatchTransform, EncodedBatch, collate_encoded
from .cifar import build_cifar_lt
from .filesets import build_image_folder, build_inat, build_list_dataset
from .manifest import build_manifest, manifest_hash, val_test_overlap, write_manifest
from .profile import long_tail_counts
from .specs import CommonSpec, DataSpec, parse_spec
from .synthetic import build_synthetic
from .transforms import RELEASED, InputConfig

BUILDERS = {
    "synthetic": build_synthetic,
    "cifar10_lt": build_cifar_lt,
    "cifar100_lt": build_cifar_lt,
    "places_lt": build_list_dataset,
    "imagenet_lt": build_list_dataset,
    "inat2018": build_inat,
    "image_folder": build_image_folder,
}


def build_dataset(spec: dict | CommonSpec, input_cfg: InputConfig | None = None) -> LTData:
    """Build the dataset named by ``spec["name"]`` (its keys: the models in ``specs``), its images
    prepared as ``input_cfg`` says (default: the released LPT code's pipeline; a backbone's own:
    ``lpt_core.backbones.input_config``)."""
    spec = parse_spec(spec)
    return BUILDERS[spec.name](spec, input_cfg or RELEASED)


__all__ = [
    "LTData",
    "DownloadError",
    "build_dataset",
    "long_tail_counts",
    "BUILDERS",
    "BatchTransform",
    "EncodedBatch",
    "collate_encoded",
    "build_manifest",
    "manifest_hash",
    "val_test_overlap",
    "write_manifest",
    "DataSpec",
    "parse_spec",
    "InputConfig",
]
