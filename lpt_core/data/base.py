"""What every dataset builder returns: the three splits and the long-tail facts about train."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset


@dataclass
class LTData:
    """Splits of a long-tailed dataset; ``train_labels`` drive the samplers, ``class_counts``
    the A-GCL cloud and the many/medium/few split. ``info`` holds facts about the splits for
    reports; every builder sets ``input_path`` and ``val_missing_classes`` (the class indices
    with no validation image, [] when none)."""

    train: Dataset
    val: Dataset
    test: Dataset
    train_labels: list[int]
    num_classes: int
    class_names: list[str]
    image_size: int = 224
    info: dict = field(default_factory=dict)
    input_cfg: Any = None  # transforms.InputConfig: normalisation, resampling, eval crop of the splits
    # GPU input path: when set, the datasets yield uint8 images and these run on the device batch.
    train_batch_transform: Callable | None = None
    eval_batch_transform: Callable | None = None
    # gpu_decode: the splits yield encoded bytes; DataLoaders must batch them with this collate.
    collate_fn: Callable | None = None

    @property
    def shot_counts(self) -> list[int]:
        """Images per class that the many/medium/few groups are judged by: the builder's
        ``info["shot_counts"]`` (iNat: the full train list, before its validation hold-out), else
        ``class_counts``."""
        return list(self.info.get("shot_counts") or self.class_counts)

    @property
    def class_counts(self) -> list[int]:
        counts = [0] * self.num_classes
        for label in self.train_labels:
            counts[label] += 1
        return counts


class DownloadError(RuntimeError):
    """``download: true`` could not fetch a dataset: the message names the URL and where the files go."""
