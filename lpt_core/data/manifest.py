"""What images each split holds, as a table and as a hash (the phase-1 cache key uses the hash),
and whether validation and test share images (``val_test_overlap``).

Rows: ``split`` (train/val/test), ``index`` (the image's id in its source: CIFAR row of the train or
test file, entry number of a list file, iNat image id, position in an image folder's sorted listing,
synthetic position), ``path`` (as listed, relative to root; null for in-memory sets), ``label``.
The hash covers class names, every row, and each split's ``fingerprint`` where the dataset has one
(CIFAR: sha256 of the pixels; synthetic: its generator parameters). Files are identified by path,
not content, and root is left out, so the same lists hash the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

import numpy as np

from .base import LTData

if TYPE_CHECKING:
    import pyarrow

SPLITS = ("train", "val", "test")


def _split(data: LTData, split: str):
    ds = getattr(data, split)
    labels = getattr(ds, "labels", None)
    if labels is None:
        raise ValueError(f"{split}: {type(ds).__name__} has no 'labels'; cannot build a manifest")
    ids = getattr(ds, "ids", None)
    return (list(range(len(labels))) if ids is None else ids), getattr(ds, "paths", None), labels, ds


def build_manifest(data: LTData) -> pyarrow.Table:
    import pyarrow as pa  # lazily: lpt_core itself needs only torch

    cols = {"split": [], "index": [], "path": [], "label": []}
    for split in SPLITS:
        ids, paths, labels, _ = _split(data, split)
        cols["split"] += [split] * len(labels)
        cols["index"] += list(ids)
        cols["path"] += list(paths) if paths is not None else [None] * len(labels)
        cols["label"] += list(labels)
    return pa.table(
        {
            "split": pa.array(cols["split"], pa.string()),
            "index": pa.array(cols["index"], pa.int64()),
            "path": pa.array(cols["path"], pa.string()),
            "label": pa.array(cols["label"], pa.int64()),
        }
    )


def manifest_hash(data: LTData) -> str:
    """sha256 hex of a canonical serialisation: stable across runs, processes and machines."""
    h = hashlib.sha256(
        json.dumps({"num_classes": data.num_classes, "class_names": data.class_names}, ensure_ascii=False).encode()
    )
    for split in SPLITS:
        ids, paths, labels, ds = _split(data, split)
        h.update(f"\n{split}:{len(labels)}\n".encode())
        h.update(np.asarray(ids, dtype="<i8").tobytes())
        h.update(np.asarray(labels, dtype="<i8").tobytes())
        h.update(b"\0".join(p.encode() for p in paths) if paths is not None else b"\1no-paths")
        h.update(f"\n{getattr(ds, 'fingerprint', '')}".encode())
    return h.hexdigest()


def write_manifest(data: LTData, path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(build_manifest(data), path)


def _resolved_paths(ds) -> list[str]:
    return [os.path.abspath(os.path.join(ds.root, p)) for p in ds.paths]


def val_test_overlap(data: LTData) -> int:
    """How many test images are also validation images (0: selecting on validation never sees the
    test split). One Dataset object serving both splits overlaps in all its images. Image files
    compare by path, resolved under the split's root to an absolute path with ``.`` and ``..``
    folded (symlinks are not followed and the files are not opened, so this stays cheap for
    lists of tens of thousands). In-memory sets (CIFAR-LT: validation from the training file,
    test from the test file; synthetic: images generated per split) are disjoint by
    construction: 0."""
    if data.val is data.test:
        return len(data.test)
    if not all(hasattr(ds, "paths") and hasattr(ds, "root") for ds in (data.val, data.test)):
        return 0
    val = set(_resolved_paths(data.val))
    return sum(p in val for p in _resolved_paths(data.test))
