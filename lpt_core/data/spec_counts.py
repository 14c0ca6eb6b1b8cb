"""Split sizes of a dataset for a dry run, on a machine with or without its files.

``data_summary(spec, input_cfg)`` builds the dataset when its files are here: the figures a search
will use and its manifest hash. Without them it takes what the spec and the files that are here
say, and names each figure it could not compute and why (``missing``):

- Places-LT, ImageNet-LT and iNaturalist with their split lists / annotation files but not the
  images: the builders run with image files unchecked (``files.images_unchecked``), so the
  figures and the manifest hash (paths and labels, never pixels) are the search's own.
- CIFAR-LT without its pickles: the official files hold ``CIFAR_PER_CLASS`` images per class,
  so the long-tail profile of ``imbalance_ratio`` gives the train counts, ``val_per_class`` of
  the images it drops the validation split (``cifar_counts``, the builder's own rule); the
  manifest hash needs the pixels.
- an image folder without its folder: nothing (its counts are the folder's contents).

It never downloads: a spec with ``download: true`` is read as if the files had to be fetched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import LTData
from .common import holdout_counts, lt_targets
from .files import images_unchecked
from .manifest import manifest_hash
from .specs import parse_spec

# the official CIFAR files: classes, training and test images per class
CIFAR_PER_CLASS = {"cifar10_lt": (10, 5000, 1000), "cifar100_lt": (100, 500, 100)}
FILE_LISTS = {"places_lt": "split lists", "imagenet_lt": "split lists", "inat2018": "annotation files"}


@dataclass
class DataSummary:
    """Sizes a search plan states; None where unknown, with the reason in ``missing``."""

    num_classes: int | None
    train: int | None
    val: int | None
    test: int | None
    manifest_hash: str | None
    data: LTData | None = None  # the dataset, when its lists or files are here
    images_here: bool = False  # its images were found (a search could start on it)
    missing: list[str] = field(default_factory=list)  # "what: why" of each figure not computed
    class_counts: list[int] | None = None  # training images per class
    val_counts: list[int] | None = None  # validation images per class
    class_names: list[str] | None = None
    val_from_train: dict[int, int] = field(default_factory=dict)  # class -> validation images its training set lent
    shot_counts: list[int] | None = None  # what the shot groups count (iNat: the full train list); None: class_counts

    @classmethod
    def of(cls, data: LTData, images_here: bool = True, missing: list[str] | None = None) -> DataSummary:
        val = [0] * data.num_classes
        for label in data.val.labels:
            val[int(label)] += 1
        return cls(
            data.num_classes,
            len(data.train_labels),
            len(data.val),
            len(data.test),
            manifest_hash(data),
            data,
            images_here,
            list(missing or []),
            data.class_counts,
            val,
            list(data.class_names),
            dict(data.info.get("val_from_train") or {}),
            data.shot_counts,
        )


def cifar_counts(
    name: str,
    imbalance_ratio: float | None,
    val_per_class: int,
    per_class: tuple[int, int] | None = None,
    val_from_train: int = 0,
) -> tuple[list[int], list[int], int]:
    """Training and validation images per class, and test images, of CIFAR-LT built from files
    that hold ``per_class`` (train, test) images of every class (default: the official files'),
    by the builder's rule (``common.holdout_counts``)."""
    classes, n_train, n_test = CIFAR_PER_CLASS[name]
    n_train, n_test = per_class or (n_train, n_test)
    kept = lt_targets([n_train] * classes, imbalance_ratio)
    split = [holdout_counts(n_train, n, val_per_class, val_from_train) for n in kept]
    return [n - lent for n, (_, lent) in zip(kept, split)], [a + b for a, b in split], classes * n_test


def _without_download(spec):
    return spec.model_copy(update={"download": False}) if getattr(spec, "download", False) else spec


def data_summary(spec, input_cfg=None) -> DataSummary:
    """The split sizes of ``spec`` (a dict or a typed spec) as a dry run states them. A malformed
    file raises as ``build_dataset`` does; absent files only make figures unknown."""
    from . import build_dataset

    spec = parse_spec(spec)
    fetched = " (data.download: true fetches it when the search starts)" if getattr(spec, "download", False) else ""
    try:
        return DataSummary.of(build_dataset(_without_download(spec), input_cfg))
    except FileNotFoundError as exc:
        absent = f"{exc}{fetched}"
    if spec.name in FILE_LISTS:
        try:
            with images_unchecked():
                data = build_dataset(spec, input_cfg)
            return DataSummary.of(data, images_here=False, missing=[f"image files: not checked ({absent})"])
        except FileNotFoundError as exc:
            return DataSummary(
                None,
                None,
                None,
                None,
                None,
                missing=[f"classes and split sizes: the {FILE_LISTS[spec.name]} are not here ({exc})"],
            )
    if spec.name in CIFAR_PER_CLASS:
        counts, val, test = cifar_counts(
            spec.name, spec.imbalance_ratio, spec.val_per_class, val_from_train=spec.val_from_train
        )
        paper = cifar_counts(spec.name, spec.imbalance_ratio, 0)[0]
        return DataSummary(
            len(counts),
            sum(counts),
            sum(val),
            test,
            None,
            class_counts=counts,
            val_counts=val,
            val_from_train={c: p - n for c, (n, p) in enumerate(zip(counts, paper)) if p > n},
            missing=[
                f"manifest hash: needs the images' pixels ({absent}); sizes from the official files' "
                f"{CIFAR_PER_CLASS[spec.name][1]} train / {CIFAR_PER_CLASS[spec.name][2]} test images per class"
            ],
        )
    return DataSummary(
        None,
        None,
        None,
        None,
        None,
        missing=[f"classes and split sizes: counted from the images, which are not here ({absent})"],
    )
