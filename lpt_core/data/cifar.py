"""CIFAR-10-LT / CIFAR-100-LT, read straight from torchvision's pickle layout under ``root``.

Train: the released LPT code's images (``IMBALANCECIFAR100`` after ``setup_seed(42)``): numpy's
global RandomState seeded 42, then for each class in class order ``np.random.shuffle`` of that
class's rows and the first n_i kept, n_i = int(n_max * (1/rho) ** (i/(C-1))) (n_max = images per
class of the file, 5000 / 500). ``released_order`` replays it with a RandomState of its own, so
the global numpy state is never touched.
Val: class-balanced, ``val_per_class`` of each class's dropped images (which ones: seeded by the
spec's ``seed``). A class that drops fewer (class 0 keeps all its images; for rho near 1 other head
classes drop few) takes the shortfall from its own training images, at most ``val_from_train``
and never its last one: those leave its training set (``info["val_from_train"]``: class ->
images lent). With ``val_from_train: 0`` (the default) the training set is the release's exactly,
class 0 has no validation image and ``info["val_missing_classes"]`` names it; classes short of
``val_per_class`` are in ``info["val_short"]``. rho = 1 drops nothing (an error unless
val_per_class: 0 or val_from_train > 0).
Test: the official test set. No md5 check: any file in the layout loads; ``download: true``
fetches the real files through torchvision only when they are missing (offline: one line at once).
"""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset

from ..reachability import unreachable
from .base import DownloadError
from .common import assemble, class_perm, data_root, holdout_counts, input_mode, lt_targets
from .transforms import RELEASED

RELEASED_SEED = 42  # the released train script's setup_seed(42), before IMBALANCECIFAR draws its subset

# name: (folder, train files, test files, meta file, label key, class-names key, torchvision class)
LAYOUT = {
    "cifar10_lt": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "labels",
        "label_names",
        torchvision.datasets.CIFAR10,
    ),
    "cifar100_lt": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        "fine_labels",
        "fine_label_names",
        torchvision.datasets.CIFAR100,
    ),
}


class ArrayImages(Dataset):
    """In-memory uint8 images [N, 3, H, W]; ``ids[i]`` is image i's row in its source file."""

    def __init__(self, images: torch.Tensor, labels: list[int], ids: list[int], transform=None):
        self.images, self.labels, self.ids, self.transform = images, labels, ids, transform
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img = self.images[index]
        return (self.transform(img) if self.transform else img), self.labels[index]

    @property
    def fingerprint(self) -> str:
        """sha256 of the pixels (the manifest hash covers content, not only indices)."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self.images.numpy().tobytes()).hexdigest()
        return self._fingerprint


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except Exception as exc:  # truncated, not a pickle, ...
        raise ValueError(f"{path}: unreadable CIFAR pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: not a CIFAR pickle (expected a dict, got {type(entry).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _load_split(base: str, files: list[str], label_key: str, num_classes: int):
    """Images [N, 3072] uint8 and labels [N] of the files, checked."""
    xs, ys = [], []
    for name in files:
        path = os.path.join(base, name)
        entry = _unpickle(path)
        if "data" not in entry or label_key not in entry:
            raise ValueError(f"{path}: missing key b'data' or b'{label_key}'")
        x, y = np.asarray(entry["data"]), np.asarray(entry[label_key], dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
            raise ValueError(
                f"{path}: expected b'data' uint8 [N, 3072] and N labels, "
                f"got {x.dtype} {list(x.shape)} and {len(y)} labels"
            )
        bad = np.flatnonzero((y < 0) | (y >= num_classes))
        if len(bad):
            raise ValueError(f"{path}: row {bad[0]}: label {y[bad[0]]} outside 0..{num_classes - 1}")
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def released_order(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Each class's rows of the training file in the order the released ``IMBALANCECIFAR10/100``
    leaves them (its first n_i are the training set): ``np.random.seed(42)``, then in class order
    ``np.random.shuffle`` of the class's ``np.where`` indices; replayed on a RandomState of its own."""
    rng = np.random.RandomState(RELEASED_SEED)
    out = []
    for c in range(num_classes):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        out.append(idx)
    return out


def build_cifar_lt(s, input_cfg=RELEASED):
    """``cifar10_lt`` / ``cifar100_lt`` from a ``specs.CifarSpec``."""
    folder, train_files, test_files, meta, label_key, names_key, tv_class = LAYOUT[s.name]
    download = s.download
    root = data_root(s, must_exist=not download)
    ratio, per_val = s.imbalance_ratio, s.val_per_class
    mode = input_mode(s, "gpu_augment")
    base = os.path.join(root, folder)
    missing = [f for f in [meta, *train_files, *test_files] if not os.path.isfile(os.path.join(base, f))]
    if missing and not download:
        raise FileNotFoundError(
            f"data.root: {os.path.join(base, missing[0])}: no such file "
            f"(torchvision's CIFAR pickle layout; data.download: true fetches it)"
        )
    if missing:
        try:
            offline = unreachable(tv_class.url)  # at once, instead of torchvision's wait on each mirror
            if offline:
                raise OSError(offline)
            tv_class(root, train=True, download=True)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad checksum a RuntimeError
            reason = getattr(exc, "reason", None) or exc
            raise DownloadError(
                f"data.download: cannot fetch {tv_class.url} ({reason}); download it "
                f"elsewhere and unpack {folder}/ into {root}"
            ) from None

    meta_path = os.path.join(base, meta)
    names = _unpickle(meta_path).get(names_key)
    if not isinstance(names, list) or not names:
        raise ValueError(f"{meta_path}: missing b'{names_key}'")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    x, y = _load_split(base, train_files, label_key, len(names))
    test_x, test_y = _load_split(base, test_files, label_key, len(names))

    by_class = [np.flatnonzero(y == c) for c in range(len(names))]
    empty = [c for c, idx in enumerate(by_class) if len(idx) == 0]
    if empty:
        raise ValueError(f"{os.path.join(base, train_files[0])}: class {empty[0]} has no training images")
    counts = lt_targets([len(idx) for idx in by_class], ratio)
    train_idx, val_idx, val_short, lent = [], [], [], {}
    for c, order in enumerate(released_order(y, len(names))):
        kept, dropped = order[: counts[c]], order[counts[c] :]
        n_dropped, n_lent = holdout_counts(len(order), counts[c], per_val, s.val_from_train)
        val_idx.append(dropped[class_perm(s.seed, c, len(dropped))[:n_dropped]])
        if n_lent:
            held = class_perm(s.seed, c, len(kept))[:n_lent]
            val_idx.append(kept[held])
            kept, lent[c] = np.delete(kept, held), n_lent
        train_idx.append(kept)
        if n_dropped + n_lent < per_val:
            val_short.append(c)
    train_idx, val_idx = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))
    if per_val and not len(val_idx):
        raise ValueError(
            "data.val_per_class: the profile drops no training images to validate on "
            "(imbalance_ratio 1); set val_per_class: 0 to build without a validation split, "
            "or val_from_train to hold some out"
        )

    def split(images, labels, ids):
        return ArrayImages(torch.from_numpy(images[ids].reshape(-1, 3, 32, 32)), labels[ids].tolist(), ids.tolist())

    return assemble(
        split(x, y, train_idx),
        split(x, y, val_idx),
        split(test_x, test_y, np.arange(len(test_y))),
        names,
        s.image_size,
        mode,
        {"imbalance_ratio": ratio, "val_per_class": per_val, "val_short": val_short, "val_from_train": lent},
        input_cfg=input_cfg,
    )
