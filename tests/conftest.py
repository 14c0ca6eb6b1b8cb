"""Shared test fixtures: tiny random ViTs and tiny synthetic long-tailed data (no downloads)."""

import os
from pathlib import Path

import pytest
import torch
from tiny_profile import SYNTHETIC

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_VIT = dict(img_size=32, patch_size=8, depth=4, embed_dim=64, num_heads=2)

# The real Places-LT split lists (reference data, never copied into the repository): the folder in
# $LPT_LT_SPLITS, else ../shared/data/lt-splits next to the checkout.
REPO = Path(__file__).resolve().parents[1]
PLACES_LT_SPLITS = os.environ.get("LPT_LT_SPLITS") or str(REPO.parent / "shared" / "data" / "lt-splits")
needs_places_lt_splits = pytest.mark.skipif(
    not os.path.isfile(os.path.join(PLACES_LT_SPLITS, "Places_LT_train.txt")),
    reason=f"no real Places-LT lists: looked for {PLACES_LT_SPLITS}/Places_LT_train.txt "
    f"(set LPT_LT_SPLITS to the folder holding Places_LT_{{train,val,test}}.txt)",
)


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

    return build_dataset(SYNTHETIC)


@pytest.fixture(scope="session")
def smoke_search(tmp_path_factory):
    """One whole smoke search (a minute or three), shared by the slow tests that inspect its outputs
    (see smoke_search.py). Read it, never change it: ``smoke_search.copy_to(tmp_path)`` to write."""
    from smoke_search import run_smoke_search

    return run_smoke_search(tmp_path_factory.mktemp("smoke_search"))
