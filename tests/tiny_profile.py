"""The test profile: a tiny random ViT and tiny synthetic long-tailed data, as the dicts a profile
holds (shared by the tests that build a model, a dataset or a whole profile; nothing downloads)."""

TINY_VIT_SPEC = {  # a profile's ``backbone`` section: timm's ViT-Ti/16 layout, shrunk, random weights
    "name": "vit_tiny_patch16_224",
    "weights": "random",
    "img_size": 32,
    "patch_size": 8,
    "depth": 4,
    "embed_dim": 96,
    "num_heads": 3,
}
SYNTHETIC = {  # ten classes, 120 down to 12 training images
    "name": "synthetic",
    "num_classes": 10,
    "imbalance_ratio": 10,
    "max_per_class": 120,
    "image_size": 32,
    "seed": 0,
}
SMALL_SYNTHETIC = {  # four classes, 12 down to 3, with validation and test images of every class
    "name": "synthetic",
    "num_classes": 4,
    "imbalance_ratio": 4,
    "max_per_class": 12,
    "val_per_class": 3,
    "test_per_class": 2,
    "image_size": 32,
    "seed": 0,
}
TINY_MODEL = {"prompt_length": 4, "pool_size": 8, "top_k": 2, "group_start": 2}


def tiny_profile(data: dict | None = None, **sections) -> dict:
    """A whole profile on ``SYNTHETIC`` (or ``data``) and the tiny ViT; ``sections`` replace or add
    top-level keys (``phase2={...}``, ``seed=3``)."""
    return {
        "data": dict(data or SYNTHETIC),
        "backbone": dict(TINY_VIT_SPEC),
        "model": dict(TINY_MODEL),
        "seed": 0,
        **sections,
    }
