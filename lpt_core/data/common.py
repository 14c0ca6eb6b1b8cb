"""Shared by the builders: spec checking with one-line ``data.<key>: ...`` errors, the seeded
per-class shuffle, and ``assemble`` which wires the CPU or on-device input path into an ``LTData``."""

from __future__ import annotations

import math
import os

import numpy as np

from .base import LTData
from .batch import BatchTransform, collate_encoded
from .profile import long_tail_counts
from .transforms import test_transform, train_transform

COMMON_KEYS = {"name", "seed", "image_size"}


class Spec:
    """A data spec with its allowed keys; readers validate and name the bad key."""

    def __init__(self, spec: dict, keys: set[str], image_size: int = 224):
        self.spec, self.name = spec, spec.get("name")
        unknown = sorted(set(spec) - COMMON_KEYS - keys)
        if unknown:
            raise ValueError(f"data.{unknown[0]}: unknown key for dataset '{self.name}' "
                             f"(known: {', '.join(sorted(COMMON_KEYS | keys))})")
        self.seed = self.number("seed", 0, minimum=0)
        self.image_size = self.number("image_size", image_size, minimum=1)

    def number(self, key: str, default, kind=int, minimum=None):
        value = self.spec.get(key, default)
        try:
            if isinstance(value, bool):
                raise TypeError
            out = kind(value)
            if (kind is int and out != float(value)) or not math.isfinite(out):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"data.{key}: expected {'an integer' if kind is int else 'a number'}, "
                             f"got {value!r}") from None
        if minimum is not None and out < minimum:
            raise ValueError(f"data.{key}: must be >= {minimum}, got {value!r}")
        return out

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.spec.get(key, default)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise ValueError(f"data.{key}: expected true or false, got {value!r}")
        return value

    def required(self, key: str) -> str:
        value = self.spec.get(key)
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise ValueError(f"data.{key}: required for dataset '{self.name}' (a path)")
        return os.fspath(value)

    def root(self, must_exist: bool = True) -> str:
        root = self.required("root")
        if must_exist and not os.path.isdir(root):
            raise FileNotFoundError(f"data.root: {root}: no such directory")
        return root

    def file(self, key: str, root: str, required: bool = True) -> str | None:
        """A file named by ``key``: absolute, relative to ``root``, else to the working directory."""
        if not required and self.spec.get(key) is None:
            return None
        value = self.required(key)
        for path in (os.path.join(root, value), value):
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(f"data.{key}: {os.path.join(root, value)}: no such file")

    def imbalance_ratio(self, default):
        if self.spec.get("imbalance_ratio", default) is None:
            return None
        return self.number("imbalance_ratio", default, kind=float, minimum=1)


def class_perm(seed: int, label: int, n: int) -> np.ndarray:
    """A permutation of range(n) fixed by (seed, class): the same spec always picks the same images."""
    return np.random.default_rng([seed, label]).permutation(n)


def lt_targets(available: list[int], ratio: float | None, where: str = "imbalance_ratio") -> list[int]:
    """Training images per class: the LT profile over classes ranked by ``available`` (most first,
    ties by class index), n_max = the largest count, capped by what each class has."""
    if ratio is None:
        return list(available)
    order = sorted(range(len(available)), key=lambda c: (-available[c], c))
    profile = long_tail_counts(max(available), len(available), ratio)
    out = [0] * len(available)
    for rank, c in enumerate(order):
        out[c] = min(available[c], profile[rank])
    if min(out) < 1:
        raise ValueError(f"data.{where}: too large for this dataset (a class gets 0 training images)")
    return out


def assemble(train, val, test, class_names: list[str], image_size: int, mode: str = "cpu",
             info: dict | None = None) -> LTData:
    """Set each split's transform for ``mode`` and return the ``LTData``.

    cpu: PIL/uint8 images go through the torchvision transforms in the loader workers.
    gpu_augment: the splits yield uint8 [3, H, W]; ``BatchTransform`` augments the device batch.
    gpu_decode: the splits yield encoded bytes; ``collate_encoded`` batches them and
    ``BatchTransform`` decodes (nvJPEG on CUDA) and augments on the device.
    """
    gpu = mode != "cpu"
    for ds in (val, test, train):
        ds.transform = None if gpu else (train_transform if ds is train else test_transform)(image_size)
        if hasattr(ds, "encoded"):
            ds.encoded = mode == "gpu_decode"
    return LTData(train=train, val=val, test=test, train_labels=list(train.labels),
                  num_classes=len(class_names), class_names=class_names, image_size=image_size,
                  info={"input_path": mode, **(info or {})},
                  train_batch_transform=BatchTransform(image_size, train=True) if gpu else None,
                  eval_batch_transform=BatchTransform(image_size, train=False) if gpu else None,
                  collate_fn=collate_encoded if mode == "gpu_decode" else None)


def input_mode(spec: Spec, gpu_key: str) -> str:
    """'cpu', or 'gpu_augment'/'gpu_decode' when the spec turns ``gpu_key`` on."""
    return gpu_key if spec.flag(gpu_key) else "cpu"
