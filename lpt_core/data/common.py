"""Shared by the builders: the spec's files with one-line ``data.<key>: ...`` errors, the seeded
per-class shuffle, and ``assemble`` which wires the CPU or on-device input path into an ``LTData``."""

from __future__ import annotations

import os

import numpy as np

from .base import LTData
from .batch import BatchTransform, collate_encoded
from .files import images_checked
from .profile import long_tail_counts
from .transforms import RELEASED, InputConfig, test_transform, train_transform


def data_root(spec, must_exist: bool = True) -> str:
    """The spec's ``root`` folder (not looked for inside ``files.images_unchecked()``)."""
    if must_exist and images_checked() and not os.path.isdir(spec.root):
        raise FileNotFoundError(f"data.root: {spec.root}: no such directory")
    return spec.root


def data_file(spec, key: str, root: str) -> str | None:
    """The file named by ``spec.<key>`` (None if unset): absolute, relative to ``root``, else to
    the working directory."""
    value = getattr(spec, key)
    if value is None:
        return None
    for path in (os.path.join(root, value), value):
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"data.{key}: {os.path.join(root, value)}: no such file")


def class_perm(seed: int, label: int, n: int) -> np.ndarray:
    """A permutation of range(n) fixed by (seed, class): the same spec always picks the same images."""
    return np.random.default_rng([seed, label]).permutation(n)


def holdout_counts(available: int, kept: int, val_per_class: int, val_from_train: int) -> tuple[int, int]:
    """(validation images from the dropped ones, validation images lent by the training set) of a
    class with ``available`` images of which the long-tail profile keeps ``kept``: up to
    ``val_per_class`` from the dropped images; the shortfall from the kept ones, at most
    ``val_from_train`` and never the class's last training image."""
    dropped = min(val_per_class, available - kept)
    return dropped, max(0, min(val_per_class - dropped, val_from_train, kept - 1))


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


def assemble(
    train,
    val,
    test,
    class_names: list[str],
    image_size: int,
    mode: str = "cpu",
    info: dict | None = None,
    input_cfg: InputConfig = RELEASED,
) -> LTData:
    """Set each split's transform for ``mode`` and ``input_cfg`` and return the ``LTData``; its
    ``info["val_missing_classes"]`` lists the classes without a validation image ([] if none).

    cpu: PIL/uint8 images go through the torchvision transforms in the loader workers.
    gpu_augment: the splits yield uint8 [3, H, W]; ``BatchTransform`` augments the device batch.
    gpu_decode: the splits yield encoded bytes; ``collate_encoded`` batches them and
    ``BatchTransform`` decodes (nvJPEG on CUDA) and augments on the device.
    """
    gpu = mode != "cpu"
    for ds in (val, test, train):
        ds.transform = None if gpu else (train_transform if ds is train else test_transform)(image_size, input_cfg)
        if hasattr(ds, "encoded"):
            ds.encoded = mode == "gpu_decode"
    validated = set(val.labels)
    missing = [c for c in range(len(class_names)) if c not in validated]
    return LTData(
        train=train,
        val=val,
        test=test,
        train_labels=list(train.labels),
        num_classes=len(class_names),
        class_names=class_names,
        image_size=image_size,
        info={"input_path": mode, **(info or {}), "val_missing_classes": missing},
        input_cfg=input_cfg,
        train_batch_transform=BatchTransform(image_size, train=True, cfg=input_cfg) if gpu else None,
        eval_batch_transform=BatchTransform(image_size, train=False, cfg=input_cfg) if gpu else None,
        collate_fn=collate_encoded if mode == "gpu_decode" else None,
    )


def input_mode(spec, gpu_key: str) -> str:
    """'cpu', or 'gpu_augment'/'gpu_decode' when the spec turns ``gpu_key`` on."""
    return gpu_key if getattr(spec, gpu_key) else "cpu"
