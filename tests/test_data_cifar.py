"""CIFAR-10-LT / CIFAR-100-LT from pickle files the tests write in torchvision's real layout."""

import os
import pickle
import socket
import time

import numpy as np
import pytest
import torch
from cluster_fixtures import free_port

from lpt_core.data import DownloadError, build_dataset, long_tail_counts, val_test_overlap
from lpt_core.data import cifar as cifar_module
from lpt_core.data.spec_counts import cifar_counts, data_summary
from lpt_core.data.transforms import test_transform as eval_transform

TEST_OFFSET = 100_000


def image_rows(ids):
    """[N, 3072] uint8 rows whose first 3 bytes encode a unique id (to check images by content)."""
    ids = np.asarray(ids)
    rows = ((ids[:, None] * 131 + np.arange(3072) * 7) % 251).astype(np.uint8)
    rows[:, 0], rows[:, 1], rows[:, 2] = ids >> 16, (ids >> 8) & 255, ids & 255
    return rows


def decode_id(img: torch.Tensor) -> int:
    r, g, b = (int(v) for v in img.flatten()[:3])
    return (r << 16) | (g << 8) | b


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar100(root, train_labels, test_labels, rows=image_rows):
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    n_classes = max(max(train_labels), max(test_labels)) + 1
    for name, labels, offset in (("train", train_labels, 0), ("test", test_labels, TEST_OFFSET)):
        dump(
            base / name,
            {
                b"filenames": [b"x.png"] * len(labels),
                b"batch_label": name.encode(),
                b"fine_labels": list(labels),
                b"coarse_labels": [0] * len(labels),
                b"data": rows(np.arange(len(labels)) + offset),
            },
        )
    dump(
        base / "meta",
        {b"fine_label_names": [f"c{i}".encode() for i in range(n_classes)], b"coarse_label_names": [b"all"]},
    )
    return root


def write_cifar10(root, train_labels, test_labels):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    n_classes = max(train_labels) + 1
    chunks = np.array_split(np.arange(len(train_labels)), 5)
    for i, chunk in enumerate(chunks, 1):
        dump(base / f"data_batch_{i}", {b"labels": [train_labels[j] for j in chunk], b"data": image_rows(chunk)})
    dump(
        base / "test_batch",
        {b"labels": list(test_labels), b"data": image_rows(np.arange(len(test_labels)) + TEST_OFFSET)},
    )
    dump(
        base / "batches.meta",
        {b"label_names": [f"k{i}".encode() for i in range(n_classes)], b"num_cases_per_batch": len(chunks[0])},
    )
    return root


def shuffled_labels(classes, per_class, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class)).tolist()


@pytest.fixture
def small100(tmp_path):
    return write_cifar100(tmp_path, shuffled_labels(5, 30), shuffled_labels(5, 10, 1))


@pytest.fixture(scope="session")
def full100(tmp_path_factory):
    """CIFAR-100's real sizes (500 train / 100 test images per class), zero pixels."""
    zeros = lambda ids: np.zeros((len(ids), 3072), np.uint8)
    return write_cifar100(
        tmp_path_factory.mktemp("cifar100"), shuffled_labels(100, 500), shuffled_labels(100, 100, 1), rows=zeros
    )


def spec(root, **kw):
    return {"name": "cifar100_lt", "root": str(root), "seed": 0, **kw}


@pytest.mark.parametrize("rho,total", [(100, 10_847), (50, 12_608), (10, 19_573)])
def test_cifar100_lt_counts_follow_the_formula(full100, rho, total):
    data = build_dataset(spec(full100, imbalance_ratio=rho))
    assert data.class_counts == long_tail_counts(500, 100, rho)
    assert len(data.train) == sum(data.class_counts) == total
    assert data.num_classes == 100 and data.class_names[:2] == ["c0", "c1"]
    assert len(data.test) == 10_000
    # class-balanced val from the dropped images: class 0 keeps all 500 and has none to give
    expected = [min(20, 500 - n) for n in data.class_counts]
    assert np.bincount(data.val.labels, minlength=100).tolist() == expected
    assert expected[0] == 0 and expected[-1] == 20
    assert data.info["val_short"] == [c for c, n in enumerate(expected) if n < 20]
    assert not set(data.train.ids) & set(data.val.ids)


def test_split_images_are_the_rows_of_the_files_and_disjoint(small100):
    data = build_dataset(spec(small100, imbalance_ratio=10, val_per_class=20, gpu_augment=True))
    assert data.class_counts == long_tail_counts(30, 5, 10) == [30, 16, 9, 5, 3]
    # 30 - n_c dropped images per class, at most 20 taken
    assert np.bincount(data.val.labels).tolist() == [0, 14, 20, 20, 20]
    assert data.info["val_short"] == [0, 1]
    assert data.info["val_missing_classes"] == [0]  # class 0 keeps all its images: none to validate on
    assert val_test_overlap(data) == 0  # in memory: validation from the training file, test from the test file
    seen = {}
    for split in ("train", "val", "test"):
        ds = getattr(data, split)
        ids = [decode_id(ds[i][0]) for i in range(len(ds))]
        assert ids == [i + (TEST_OFFSET if split == "test" else 0) for i in ds.ids]
        seen[split] = set(ids)
    assert not seen["val"] & seen["train"] and not seen["val"] & seen["test"]
    assert len(seen["test"]) == 50
    img, label = data.train[3]
    raw = image_rows([data.train.ids[3]])[0].reshape(3, 32, 32)
    assert img.dtype == torch.uint8 and torch.equal(img, torch.from_numpy(raw))  # CHW, R plane first
    labels = pickle.load(open(small100 / "cifar-100-python" / "train", "rb"))[b"fine_labels"]
    assert label == labels[data.train.ids[3]]


def test_training_set_is_the_releases_and_the_seed_picks_the_validation_images(small100):
    a, b = (build_dataset(spec(small100, imbalance_ratio=10)) for _ in range(2))
    c = build_dataset(spec(small100, imbalance_ratio=10, seed=1))
    assert a.train.ids == b.train.ids and a.val.ids == b.val.ids
    assert a.train.ids == c.train.ids and a.val.ids != c.val.ids and a.class_counts == c.class_counts


def released_imbalance_rows(labels, imb_factor):
    """The training rows of the released ``IMBALANCECIFAR10/100`` (vtab/imbalanced_cifar.py of
    DongSky/LPT), written here from its code: ``setup_seed(42)`` seeds numpy's global RandomState,
    ``get_img_num_per_cls`` ('exp'), then ``gen_imbalanced_data``'s per-class shuffle and first n."""
    state = np.random.get_state()
    try:
        np.random.seed(42)
        targets_np = np.array(labels, dtype=np.int64)
        classes = np.unique(targets_np)
        cls_num = len(classes)
        img_max = len(labels) / cls_num
        img_num_per_cls = [int(img_max * (imb_factor ** (i / (cls_num - 1.0)))) for i in range(cls_num)]
        rows = []
        for the_class, the_img_num in zip(classes, img_num_per_cls):
            idx = np.where(targets_np == the_class)[0]
            np.random.shuffle(idx)
            rows.extend(idx[:the_img_num].tolist())
    finally:
        np.random.set_state(state)
    return rows


@pytest.mark.parametrize("rho", [100, 50, 10])
def test_cifar100_lt_training_rows_are_the_released_codes(full100, rho):
    """The same rows of the real-format training file as the released rule, at CIFAR-100's sizes."""
    labels = pickle.load(open(full100 / "cifar-100-python" / "train", "rb"))[b"fine_labels"]
    released = released_imbalance_rows(labels, 1 / rho)
    data = build_dataset(spec(full100, imbalance_ratio=rho))
    assert len(data.train.ids) == len(released) and set(data.train.ids) == set(released)
    assert not set(data.val.ids) & set(released)  # validation only from the images the rule drops


def test_cifar10_lt_training_rows_are_the_released_codes_and_class_0_lends_validation(tmp_path):
    """CIFAR-10's five batch files; with val_from_train the released rows are exactly the training
    set plus the images class 0 lends to validation, and nothing else of the training set moves."""
    labels = shuffled_labels(10, 300)
    root = write_cifar10(tmp_path, labels, shuffled_labels(10, 4))
    released = set(released_imbalance_rows(labels, 0.01))
    exact = build_dataset({"name": "cifar10_lt", "root": str(root), "imbalance_ratio": 100, "val_per_class": 20})
    assert set(exact.train.ids) == released and exact.info["val_missing_classes"] == [0]
    lent = build_dataset(
        {"name": "cifar10_lt", "root": str(root), "imbalance_ratio": 100, "val_per_class": 20, "val_from_train": 20}
    )
    from_train = set(lent.val.ids) & released
    assert set(lent.train.ids) | from_train == released and not set(lent.train.ids) & from_train
    assert {labels[i] for i in from_train} == {0} and len(from_train) == 20
    assert lent.info["val_from_train"] == {0: 20} and lent.info["val_missing_classes"] == []
    assert np.bincount(lent.val.labels).tolist() == [20] * 10
    assert lent.class_counts[0] == 280 and lent.class_counts[1:] == exact.class_counts[1:]
    counts, val, _ = cifar_counts("cifar10_lt", 100, 20, (300, 4), val_from_train=20)
    assert (counts, val) == (lent.class_counts, [20] * 10)  # the dry run's rule is the builder's


def test_cifar10_layout_with_five_batches(tmp_path):
    root = write_cifar10(tmp_path, shuffled_labels(5, 30), shuffled_labels(5, 4))
    data = build_dataset({"name": "cifar10_lt", "root": str(root), "imbalance_ratio": 3, "image_size": 32})
    assert data.class_counts == long_tail_counts(30, 5, 3)
    assert data.class_names == ["k0", "k1", "k2", "k3", "k4"] and len(data.test) == 20
    img, _ = data.train[0]  # CPU path: the test transform's sibling, float normalised
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and img.min() >= -1 and img.max() <= 1
    val_img, _ = data.val[0]
    raw = torch.from_numpy(image_rows([data.val.ids[0]])[0].reshape(3, 32, 32))
    assert torch.allclose(val_img, eval_transform(32)(raw))


def test_rho_one_and_fractional_rho(small100):
    assert build_dataset(spec(small100, imbalance_ratio=1, val_per_class=0)).class_counts == [30] * 5
    with pytest.raises(ValueError, match="data.val_per_class: .*drops no training images"):
        build_dataset(spec(small100, imbalance_ratio=1))
    assert build_dataset(spec(small100, imbalance_ratio=2.5)).class_counts == long_tail_counts(30, 5, 2.5)


def test_gpu_augment_batches_match_the_cpu_eval_transform(small100):
    data = build_dataset(spec(small100, imbalance_ratio=10, gpu_augment=True, image_size=64))
    assert data.info["input_path"] == "gpu_augment" and data.collate_fn is None
    images, labels = next(iter(torch.utils.data.DataLoader(data.test, batch_size=16)))
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32)
    out = data.eval_batch_transform(images)
    ref = torch.stack([eval_transform(64)(img) for img in images])
    assert out.shape == ref.shape == (16, 3, 64, 64)
    assert (out - ref).abs().max() < 2 / 255 + 1e-4  # equal up to uint8 rounding in the reference
    train = data.train_batch_transform(images)
    assert train.shape == (16, 3, 64, 64) and train.dtype == torch.float32
    assert -1 <= train.min() and train.max() <= 1 and not torch.allclose(train, out)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(imbalance_ratio=0.5), r"^data.imbalance_ratio: must be >= 1"),
        (dict(imbalance_ratio="x"), r"^data.imbalance_ratio: must be a number, got .x."),
        (dict(val_per_class=-1), r"^data.val_per_class: must be >= 0"),
        (dict(imbalance_ratio=1000), r"^data.imbalance_ratio: too large"),
        (dict(ratio=10), r"^data.ratio: unknown key for dataset 'cifar100_lt'"),
        (dict(gpu_decode=True), r"^data.gpu_decode: unknown key"),
        (dict(download="maybe"), r"^data.download: must be true or false, got .maybe."),
    ],
)
def test_bad_spec_values_name_the_key(small100, change, message):
    with pytest.raises(ValueError, match=message):
        build_dataset(spec(small100, **change))


def test_missing_and_broken_files_are_named(tmp_path, small100):
    with pytest.raises(FileNotFoundError, match=r"data.root: .*nowhere: no such directory"):
        build_dataset(spec(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/cifar-100-python/meta: no such file.*download"):
        build_dataset(spec(tmp_path / "empty", download=False))
    train = small100 / "cifar-100-python" / "train"
    train.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=rf"{train}: unreadable CIFAR pickle"):
        build_dataset(spec(small100))
    dump(train, {b"data": image_rows(range(3)), b"fine_labels": [0, 7, 1]})
    with pytest.raises(ValueError, match=rf"{train}: row 1: label 7 outside 0..4"):
        build_dataset(spec(small100))
    dump(train, {b"data": np.zeros((3, 100), np.uint8), b"fine_labels": [0, 1, 2]})
    with pytest.raises(ValueError, match=rf"{train}: expected b'data' uint8 \[N, 3072\]"):
        build_dataset(spec(small100))


def test_download_only_when_files_are_missing(tmp_path, small100, monkeypatch):
    calls = []
    source = socket.create_server(("127.0.0.1", 0))  # a reachable download host (it is asked before a download)

    class FakeCIFAR100:
        url = f"http://127.0.0.1:{source.getsockname()[1]}/cifar-100-python.tar.gz"

        def __init__(self, root, train, download):
            calls.append((root, download))
            write_cifar100(tmp_path / "fresh", shuffled_labels(5, 30), shuffled_labels(5, 10))

    monkeypatch.setitem(cifar_module.LAYOUT, "cifar100_lt", cifar_module.LAYOUT["cifar100_lt"][:-1] + (FakeCIFAR100,))
    build_dataset(spec(small100, download=True, imbalance_ratio=10))
    assert calls == []
    data = build_dataset(spec(tmp_path / "fresh", download=True, imbalance_ratio=10))
    assert calls == [(os.fspath(tmp_path / "fresh"), True)] and len(data.test) == 50
    source.close()


@pytest.mark.parametrize("rho, val_per_class", [(100, 20), (10, 50), (1, 0)])
def test_dry_run_sizes_without_the_files_are_the_builders(full100, tmp_path, rho, val_per_class):
    """Without the pickles, the sizes come from the official files' 500/100 images per class."""
    here = data_summary(spec(full100, imbalance_ratio=rho, val_per_class=val_per_class))
    away = data_summary(spec(tmp_path / "absent", imbalance_ratio=rho, val_per_class=val_per_class))
    assert (away.num_classes, away.train, away.val, away.test) == (here.num_classes, here.train, here.val, here.test)
    assert (away.class_counts, away.val_counts) == (here.class_counts, here.val_counts)
    assert here.images_here and here.manifest_hash and not here.missing
    assert away.data is None and away.manifest_hash is None and len(away.missing) == 1
    assert away.missing[0].startswith(
        f"manifest hash: needs the images' pixels (data.root: {tmp_path / 'absent'}: "
        f"no such directory); sizes from the official files' 500 train / 100 test"
    )


def test_cifar_lt_sizes_from_the_spec_are_the_papers():
    """CIFAR-10-LT / CIFAR-100-LT at imbalance 100: 12,406 / 10,847 training images (LDAM-DRW, LPT)."""
    assert [sum(cifar_counts(n, 100, 20)[0]) for n in ("cifar10_lt", "cifar100_lt")] == [12_406, 10_847]
    counts, val, test = cifar_counts("cifar10_lt", 100, 20)
    assert val == [0] + [20] * 9 and test == 10_000  # class 0 keeps all its 5,000 images: none to validate on


def test_download_is_never_tried_by_a_dry_run_and_fails_fast_offline(tmp_path, monkeypatch):
    """Offline (here: every https request goes through a proxy that refuses), data.download fails at
    once with one line; a dry run does not try it."""
    port = free_port()
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("no_proxy", raising=False)
    summary = data_summary(spec(tmp_path, download=True))
    assert summary.train == 10_847 and "(data.download: true fetches it when the search starts)" in summary.missing[0]
    assert not (tmp_path / "cifar-100-python").exists()
    started = time.monotonic()
    with pytest.raises(DownloadError) as err:
        build_dataset(spec(tmp_path, download=True))
    assert time.monotonic() - started < 30  # loose: this shared machine is noisy
    assert str(err.value) == (
        f"data.download: cannot fetch {cifar_module.LAYOUT['cifar100_lt'][-1].url} "
        f"(127.0.0.1:{port}: connection refused); download it elsewhere and unpack "
        f"cifar-100-python/ into {tmp_path}"
    )
