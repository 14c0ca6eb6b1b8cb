"""The spec of each dataset (a profile's ``data`` section) as a typed model: its keys, defaults and
ranges. ``DataSpec`` is their union, told apart by ``name``; ``parse_spec`` validates a dict into
one, with one-line ``data.<key>: ...`` errors. Whether files exist is the builders' business."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated, Literal, Union

from pydantic import BeforeValidator, Field, StringConstraints, TypeAdapter

from ..config import Section, validate

PathStr = Annotated[
    str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v), StringConstraints(min_length=1)
]
Count = Annotated[int, Field(ge=0)]


class CommonSpec(Section):
    name: str  # each dataset's own literal
    seed: int = Field(0, ge=0, description="fixes which images each split gets")
    image_size: int = Field(224, ge=1, description="side of the square images the model sees")

    @classmethod
    def _owner(cls, data: dict) -> str:
        return f" for dataset '{data.get('name')}'"


class SyntheticSpec(CommonSpec):
    """Generated stripes, one colour and orientation per class (smoke runs and tests)."""

    name: Literal["synthetic"]
    image_size: int = Field(32, ge=1)
    num_classes: int = Field(10, ge=1)
    imbalance_ratio: float = Field(10.0, ge=1)
    max_per_class: int = Field(100, ge=1)
    val_per_class: Count = 20
    test_per_class: Count = 20
    families: Count = Field(0, description="classes fall into this many colour families (0: none)")
    gpu_augment: bool = False


class CifarSpec(CommonSpec):
    """CIFAR-10-LT / CIFAR-100-LT from torchvision's pickle layout under ``root``."""

    name: Literal["cifar10_lt", "cifar100_lt"]
    root: PathStr
    imbalance_ratio: float | None = Field(100.0, ge=1)
    val_per_class: Count = Field(20, description="validation images per class, from the images the profile drops")
    val_from_train: Count = Field(
        0,
        description="a class that drops fewer than val_per_class (class 0 drops none) takes the rest from its "
        "training images, at most this many (they leave its training set; 0: the released training set exactly)",
    )
    download: bool = False
    gpu_augment: bool = False


class ListSpec(CommonSpec):
    """Places-LT / ImageNet-LT: ``relative/path label`` lists of images under ``root``."""

    name: Literal["places_lt", "imagenet_lt"]
    root: PathStr
    train_list: PathStr
    val_list: PathStr
    test_list: PathStr
    class_names: PathStr | None = None
    gpu_decode: bool = False


class InatSpec(CommonSpec):
    """iNaturalist 2018: COCO-style JSON; validation is a class-stratified hold-out of the train
    list, the official val list is the test split."""

    name: Literal["inat2018"]
    root: PathStr
    train_json: PathStr
    val_json: PathStr
    val_per_class: Count = Field(
        3, description="train images per class held out for validation (a class keeps at least two training images)"
    )
    gpu_decode: bool = False


class ImageFolderSpec(CommonSpec):
    """``root/<class>/<images>``; held-out val/test per class, optional LT profile."""

    name: Literal["image_folder"]
    root: PathStr
    imbalance_ratio: float | None = Field(None, ge=1)
    val_per_class: Count = 20
    test_per_class: Count = 20
    gpu_decode: bool = False


SPECS = (SyntheticSpec, CifarSpec, ListSpec, InatSpec, ImageFolderSpec)
if TYPE_CHECKING:  # the same union, spelt out for mypy (it cannot read a Union of a tuple)
    DataSpec = SyntheticSpec | CifarSpec | ListSpec | InatSpec | ImageFolderSpec
else:
    DataSpec = Annotated[Union[SPECS], Field(discriminator="name")]  # noqa: UP007 (a Union of the tuple SPECS)
_ADAPTER = TypeAdapter(DataSpec)


def parse_spec(spec: dict | Section) -> Section:
    """The typed spec of a ``data`` dict (a typed spec passes through)."""
    if isinstance(spec, CommonSpec):
        return spec
    return validate(_ADAPTER, spec, "data")
