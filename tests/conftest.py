"""Shared test fixtures: tiny random ViTs and tiny synthetic long-tailed data (no downloads)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_VIT = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2)

# the real Places-LT split lists, where this machine has them
PLACES_LT_SPLITS = "/work/shared/data/lt-splits"
needs_places_lt_splits = pytest.mark.skipif(not os.path.isdir(PLACES_LT_SPLITS),
                                            reason=f"{PLACES_LT_SPLITS} (real Places-LT lists) is absent")


def tiny_backbone(**overrides):
    from lpt_core import build_backbone
    torch.manual_seed(0)
    return build_backbone("vit_tiny_patch16_224", "random", **{**TINY_VIT, **overrides})


@pytest.fixture
def backbone():
    return tiny_backbone()


@pytest.fixture
def synthetic_data():
    from lpt_core.data import build_dataset
    return build_dataset({"name": "synthetic", "num_classes": 10, "imbalance_ratio": 10,
                          "max_per_class": 120, "image_size": 32, "seed": 0})


@pytest.fixture(scope="session")
def smoke_search(tmp_path_factory):
    """One whole smoke search (a minute or three), shared by the slow tests that inspect its outputs
    (see smoke_search.py). Read it, never change it: ``smoke_search.copy_to(tmp_path)`` to write."""
    from smoke_search import run_smoke_search
    return run_smoke_search(tmp_path_factory.mktemp("smoke_search"))
