"""Image-file datasets (split lists, COCO JSON, class folders) on JPEGs the tests write with PIL;
the list parser against the real Places-LT lists."""

import dataclasses
import json
import os
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PLACES_LT_SPLITS, needs_places_lt_splits
from PIL import Image

from lpt_core.data import EncodedBatch, build_dataset, long_tail_counts, manifest_hash, val_test_overlap
from lpt_core.data.files import read_list
from lpt_core.data.spec_counts import data_summary
from lpt_core.trainer import to_device

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision.io

COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (200, 200, 20)]


def write_image(path, label, size=(40, 30), fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(zlib.crc32(path.name.encode())).integers(-20, 20, (size[1], size[0], 3))
    pixels = np.clip(np.array(COLORS[label]) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, fmt)


def write_list(root, name, rows):
    (root / name).write_text("".join(f"{p} {y}\n" for p, y in rows))
    for p, y in rows:
        if not (root / p).exists():
            write_image(root / p, y)
    return root / name


@pytest.fixture
def places(tmp_path):
    """A Places-LT-shaped tree: train/<class>/*.jpg, val/<class>/*.jpg and three lists."""
    root = tmp_path / "places"
    root.mkdir()
    train = [(f"train/c{y}/{i:03d}.jpg", y) for y, n in enumerate([6, 3, 2]) for i in range(n)]
    val = [(f"train/c{y}/v{i}.jpg", y) for y in range(3) for i in range(2)]
    test = [(f"val/c{y}/t{i}.jpg", y) for y in range(3) for i in range(2)]
    for name, rows in (("train.txt", train), ("val.txt", val), ("test.txt", test)):
        write_list(root, name, rows)
    return root


def list_spec(root, **kw):
    return {
        "name": "places_lt",
        "root": str(root),
        "train_list": "train.txt",
        "val_list": "val.txt",
        "test_list": "test.txt",
        "image_size": 32,
        **kw,
    }


def test_list_dataset_reads_the_lists(places, tmp_path, monkeypatch):
    data = build_dataset(list_spec(places))
    assert data.class_counts == [6, 3, 2] and data.num_classes == 3
    assert data.class_names == ["class_0", "class_1", "class_2"]
    assert len(data.val) == len(data.test) == 6 and data.test.paths[0] == "val/c0/t0.jpg"
    img, label = data.train[7]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label == 1
    # a reddish/greenish image stays that way through the transform (RGB order kept)
    assert img[1].mean() > img[0].mean() and img[1].mean() > img[2].mean()
    names = tmp_path / "names.txt"
    names.write_text("airfield\nbakery\ncanyon\n")
    absolute = os.fspath(places / "test.txt")
    data = build_dataset(list_spec(places, name="imagenet_lt", class_names=os.fspath(names), test_list=absolute))
    assert data.class_names == ["airfield", "bakery", "canyon"] and len(data.test) == 6
    monkeypatch.chdir(tmp_path)  # a list path relative to the working directory (not to root)
    assert build_dataset(list_spec(places, val_list="places/val.txt")).val.paths == data.val.paths


@needs_places_lt_splits
def test_parser_on_the_real_places_lt_lists():
    lists = {s: read_list(os.path.join(PLACES_LT_SPLITS, f"Places_LT_{s}.txt")) for s in ("train", "val", "test")}
    assert [len(lists[s].paths) for s in ("train", "val", "test")] == [62_500, 7_300, 36_500]
    counts = Counter(lists["train"].labels)
    assert len(counts) == 365 and set(counts) == set(range(365))
    assert max(counts.values()) == 4980 and min(counts.values()) == 5
    assert set(Counter(lists["val"].labels).values()) == {20}
    assert set(Counter(lists["test"].labels).values()) == {100}
    assert lists["train"].paths[0] == "train/airfield/00004851.jpg" and lists["train"].lines[-1] == 62_500


# bad list inputs: {files to write}, data-spec overrides, the error and its message. "{places}" (the
# Places-LT-shaped tree) and "{tmp_path}" stand for the fixtures' folders in all four.
LIST_ERRORS = [
    pytest.param(
        {"{places}/bad.txt": "train/c0/000.jpg 0\n\ntrain/c0/001.jpg zero\n"},
        {"val_list": "bad.txt"},
        ValueError,
        r"^{places}/bad.txt:3: expected 'relative/path label'",
        id="unparsable-line",
    ),
    pytest.param(
        {"{places}/bad.txt": "train/c0/000.jpg 0\ntrain/c0/001.jpg 3\n"},
        {"test_list": "bad.txt"},
        ValueError,
        r"^{places}/bad.txt:2: label 3 outside 0..2",
        id="label-too-big",
    ),
    pytest.param(
        {"{places}/bad.txt": "train/c0/000.jpg -1\n"},
        {"val_list": "bad.txt"},
        ValueError,
        r"^{places}/bad.txt:1: label -1 outside 0..2",
        id="negative-label",
    ),
    pytest.param(
        {"{places}/bad.txt": "train/c0/000.jpg 0\ntrain/c9/gone.jpg 1\ntrain/c9/gone2.jpg 1\n"},
        {"val_list": "bad.txt"},
        FileNotFoundError,
        r"^{places}/bad.txt:2: .*c9/gone.jpg: no such image file \(and 1 more",
        id="missing-images",
    ),
    pytest.param(
        {"{places}/bad.txt": "train/c0/000.jpg 0\ntrain/c2/000.jpg 2\n"},
        {"train_list": "bad.txt"},
        ValueError,
        r"^{places}/bad.txt: class 1 has no training images",
        id="empty-class",
    ),
    pytest.param(
        {},
        {"val_list": "nope.txt"},
        FileNotFoundError,
        r"^data.val_list: {places}/nope.txt: no such file",
        id="missing-list",
    ),
    pytest.param(
        {}, {"test_list": None}, ValueError, r"^data.test_list: must be a non-empty string, got None", id="no-test-list"
    ),
    pytest.param(
        {},
        {"imbalance_ratio": 10},
        ValueError,
        r"^data.imbalance_ratio: unknown key for dataset 'places_lt'",
        id="unknown-key",
    ),
    pytest.param(
        {"{tmp_path}/names.txt": "a\nb\n"},
        {"class_names": "{tmp_path}/names.txt"},
        ValueError,
        r"^{places}/train.txt:\d+: label 2 outside 0..1",
        id="too-few-class-names",
    ),
    pytest.param(
        {},
        {"root": "{tmp_path}/missing"},
        FileNotFoundError,
        r"^data.root: .*missing: no such directory",
        id="missing-root",
    ),
]


@pytest.mark.parametrize("files, overrides, error, message", LIST_ERRORS)
def test_list_errors_name_the_file_and_line(places, tmp_path, files, overrides, error, message):
    def fill(text):
        if not isinstance(text, str):
            return text
        return text.replace("{places}", str(places)).replace("{tmp_path}", str(tmp_path))

    for path, content in files.items():
        Path(fill(path)).write_text(content)
    with pytest.raises(error, match=fill(message)):
        build_dataset(list_spec(places) | {key: fill(value) for key, value in overrides.items()})


def test_unreadable_image_is_named_at_load_time(places):
    (places / "train/c1/001.jpg").write_bytes(b"\xff\xd8 truncated")
    data = build_dataset(list_spec(places))
    with pytest.raises(ValueError, match=rf"^{places}/train/c1/001.jpg: unreadable image"):
        data.train[7]
    data = build_dataset(list_spec(places, gpu_decode=True))
    batch, _ = data.collate_fn([data.train[6], data.train[7]])
    with pytest.raises(ValueError, match=rf"^{places}/train/c1/001.jpg: unreadable image"):
        data.train_batch_transform(batch)


def test_gpu_decode_batches(places):
    write_image(places / "val/c2/t1.jpg", 2, size=(64, 48), fmt="PNG")  # a PNG among JPEGs
    data = build_dataset(list_spec(places, gpu_decode=True, image_size=24))
    cpu = build_dataset(list_spec(places, image_size=24))
    assert data.info["input_path"] == "gpu_decode" and data.test.collate_fn is data.collate_fn
    (item, path), label = data.train[0]
    assert item.dtype == torch.uint8 and item.dim() == 1 and path.endswith("train/c0/000.jpg") and label == 0
    loader = torch.utils.data.DataLoader(data.test, batch_size=6, collate_fn=data.collate_fn)
    batch, labels = next(iter(loader))
    assert isinstance(batch, EncodedBatch) and batch.shape[0] == 6 and labels.tolist() == [0, 0, 1, 1, 2, 2]
    images, labels = to_device(batch, labels, torch.device("cpu"), data.eval_batch_transform)
    ref = torch.stack([cpu.test[i][0] for i in range(6)])
    assert images.shape == ref.shape == (6, 3, 24, 24)
    assert (images - ref).abs().mean() < 0.03  # same decode/resize up to JPEG IDCT and resampling
    train = data.train_batch_transform(batch)
    assert train.shape == (6, 3, 24, 24) and -1 <= train.min() and train.max() <= 1
    workers = torch.utils.data.DataLoader(data.test, batch_size=6, num_workers=1, collate_fn=data.collate_fn)
    batch, labels = next(iter(workers))  # the encoded batch crosses the worker queue
    assert torch.equal(data.eval_batch_transform(batch), images) and labels.tolist() == [0, 0, 1, 1, 2, 2]


def write_coco(path, images, categories):
    doc = {
        "images": [{"id": i, "file_name": f} for i, f, _ in images],
        "annotations": [{"id": k, "image_id": i, "category_id": c} for k, (i, _, c) in enumerate(images)],
        "categories": [{"id": c, "name": n} for c, n in categories],
    }
    path.write_text(json.dumps(doc, indent=1))


def inat_tree(tmp_path, train_counts, val_counts):
    """iNat-style COCO JSON pair and its JPEGs: categories 10 (Ant), 20 (Bee), 30 (Zebra), listed
    out of order; image ids 100+ in train2018.json, 900+ in val2018.json."""
    cats = [(30, "Zebra"), (10, "Ant"), (20, "Bee")]  # labels follow sorted ids: Ant, Bee, Zebra
    train = [
        (100 + k, f"train_val2018/{c}/{k}.jpg", c)
        for k, c in enumerate(c for c, n in zip((10, 20, 30), train_counts) for _ in range(n))
    ]
    val = [
        (900 + k, f"train_val2018/{c}/v{k}.jpg", c)
        for k, c in enumerate(c for c, n in zip((10, 20, 30), val_counts) for _ in range(n))
    ]
    for _i, f, c in train + val:
        write_image(tmp_path / f, c // 10 - 1)
    write_coco(tmp_path / "train2018.json", train, cats)
    write_coco(tmp_path / "val2018.json", val, cats)
    return (
        {
            "name": "inat2018",
            "root": str(tmp_path),
            "train_json": "train2018.json",
            "val_json": "val2018.json",
            "image_size": 16,
        },
        train,
        val,
    )


def test_inat_validates_on_a_train_hold_out_and_tests_on_the_official_val(tmp_path):
    spec, train, val = inat_tree(tmp_path, train_counts=(8, 3, 1), val_counts=(2, 2, 1))
    data = build_dataset(spec)  # val_per_class: 3
    assert data.class_names == ["Ant", "Bee", "Zebra"]
    # up to 3 per class, never leaving fewer than 2: Ant gives 3 of 8, Bee 1 of 3, Zebra 0 of 1
    assert Counter(data.val.labels) == {0: 3, 1: 1} and data.class_counts == [5, 2, 1]
    assert data.shot_counts == [8, 3, 1]  # the shot groups count the full train list
    assert data.info["val_missing_classes"] == [2] and data.info["val_per_class"] == 3
    listed = {i: (f, c // 10 - 1) for i, f, c in train}
    assert set(data.val.ids) <= set(listed) and not set(data.val.ids) & set(data.train.ids)
    assert sorted(data.val.ids + data.train.ids) == sorted(listed)  # a partition of the train list
    assert all(listed[i] == (p, y) for i, p, y in zip(data.val.ids, data.val.paths, data.val.labels))
    assert data.test.ids == [i for i, _, _ in val] and data.test.labels == [0, 0, 1, 1, 2]
    assert data.test is not data.val and val_test_overlap(data) == 0
    assert data.train[0][0].shape == (3, 16, 16)
    # seeded by the spec's seed: the same spec holds out the same images, other seeds others
    assert build_dataset(spec).val.ids == data.val.ids
    assert any(build_dataset({**spec, "seed": s}).val.ids != data.val.ids for s in (1, 2, 3))
    assert manifest_hash(build_dataset({**spec, "seed": 1})) != manifest_hash(data)
    one = build_dataset({**spec, "val_per_class": 1})
    assert Counter(one.val.labels) == {0: 1, 1: 1} and one.class_counts == [7, 2, 1]
    small, _, _ = inat_tree(tmp_path / "small", train_counts=(8, 2, 4), val_counts=(1, 1, 1))
    small = build_dataset(small)  # a class of 2 gives none (unvalidated, named), one of 4 gives 2 and keeps 2
    assert Counter(small.val.labels) == {0: 3, 2: 2} and small.class_counts == [5, 2, 2]
    assert small.info["val_missing_classes"] == [1] and small.shot_counts == [8, 2, 4]
    assert manifest_hash(one) != manifest_hash(data)
    none = build_dataset({**spec, "val_per_class": 0})
    assert len(none.val) == 0 and none.class_counts == [8, 3, 1] and none.info["val_missing_classes"] == [0, 1, 2]


def test_inat_json_errors_name_the_file(tmp_path):
    spec, train, val = inat_tree(tmp_path, train_counts=(3, 2, 1), val_counts=(1, 1, 1))
    cats = [(30, "Zebra"), (10, "Ant"), (20, "Bee")]
    write_coco(tmp_path / "val2018.json", val + [(999, val[0][1], 40)], cats)
    with pytest.raises(ValueError, match=r"val2018.json: annotations\[3\]: category_id 40 is not a train category"):
        build_dataset(spec)
    (tmp_path / "val2018.json").write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(ValueError, match=r"val2018.json:2: malformed JSON"):
        build_dataset(spec)
    (tmp_path / "val2018.json").write_text('{"images": [{"id": 1}], "annotations": []}')
    with pytest.raises(ValueError, match=r"val2018.json: malformed COCO-style JSON \(missing key 'file_name'\)"):
        build_dataset(spec)
    with pytest.raises(ValueError, match=r"^data.val_per_class: must be >= 0"):
        build_dataset({**spec, "val_per_class": -1})


def test_val_test_overlap_counts_shared_images(places):
    data = build_dataset(list_spec(places))
    assert val_test_overlap(data) == 0 and data.info["val_missing_classes"] == []
    same = build_dataset(list_spec(places, val_list="test.txt"))  # val_list equals test_list
    assert same.val is not same.test and val_test_overlap(same) == len(same.test) == 6
    # one Dataset object serving both splits: all of it
    assert val_test_overlap(dataclasses.replace(data, test=data.val)) == len(data.val)
    # paths compare as resolved under root: './a/../a' spellings and an absolute path are one file
    rows = [(f"./val/c{y}/../c{y}/t{i}.jpg", y) for y in range(3) for i in range(2)][:3]
    rows[0] = (str(places / "val/c0/t0.jpg"), 0)
    write_list(places, "odd.txt", rows)
    assert val_test_overlap(build_dataset(list_spec(places, val_list="odd.txt"))) == 3


def test_image_folder_holds_out_and_applies_the_profile(tmp_path):
    sizes = {"cat": 9, "dog": 14, "emu": 7}  # dog is the biggest class, ranked first by the profile
    for c, (name, n) in enumerate(sizes.items()):
        for i in range(n):
            write_image(tmp_path / name / f"{i:02d}.jpg", c)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    spec = {"name": "image_folder", "root": str(tmp_path), "val_per_class": 2, "test_per_class": 1, "image_size": 16}
    plain = build_dataset(spec)
    assert plain.class_names == ["cat", "dog", "emu"] and plain.class_counts == [6, 11, 4]
    data = build_dataset({**spec, "imbalance_ratio": 4})
    ranked = long_tail_counts(11, 3, 4)  # dog, cat, emu
    assert data.class_counts == [min(6, ranked[1]), ranked[0], min(4, ranked[2])] == [5, 11, 2]
    assert Counter(data.val.labels) == {0: 2, 1: 2, 2: 2} and Counter(data.test.labels) == {0: 1, 1: 1, 2: 1}
    splits = [set(getattr(data, s).ids) for s in ("train", "val", "test")]
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2]) and not (splits[1] & splits[2])
    assert set(data.val.paths) == set(plain.val.paths)  # hold-outs do not depend on the profile
    assert all(p.split("/")[0] == data.class_names[y] for p, y in zip(data.train.paths, data.train.labels))
    with pytest.raises(ValueError, match=r"^data.val_per_class: class folder 'emu' has 7 images"):
        build_dataset({**spec, "val_per_class": 6})
    with pytest.raises(ValueError, match=r"^data.imbalance_ratio: must be >= 1"):
        build_dataset({**spec, "imbalance_ratio": 0})


def test_dry_run_sizes_from_the_lists_without_the_images(places, tmp_path):
    """The lists alone give a search's sizes and manifest hash (paths and labels, never pixels)."""
    lists_only = tmp_path / "lists"
    lists_only.mkdir()
    for name in ("train.txt", "val.txt", "test.txt"):
        (lists_only / name).write_text((places / name).read_text())
    here, away = data_summary(list_spec(places)), data_summary(list_spec(lists_only))
    assert (here.num_classes, here.train, here.val, here.test) == (3, 11, 6, 6) and here.images_here
    assert (away.num_classes, away.train, away.val, away.test, away.manifest_hash) == (
        here.num_classes,
        here.train,
        here.val,
        here.test,
        here.manifest_hash,
    )
    assert not away.images_here and away.missing == [
        f"image files: not checked ({lists_only}/train.txt:1: {lists_only}/train/c0/000.jpg: no such image file "
        f"(and 10 more missing))"
    ]
    gone = data_summary(list_spec(tmp_path / "nowhere"))
    assert gone.train is None and gone.missing == [
        f"classes and split sizes: the split lists are not here (data.train_list: {tmp_path}/nowhere/train.txt: "
        f"no such file)"
    ]


@needs_places_lt_splits
def test_dry_run_sizes_of_the_real_places_lt_lists(tmp_path):
    lists = {k: os.path.join(PLACES_LT_SPLITS, f"Places_LT_{k}.txt") for k in ("train", "val", "test")}
    s = data_summary(
        {
            "name": "places_lt",
            "root": str(tmp_path / "places365"),
            "train_list": lists["train"],
            "val_list": lists["val"],
            "test_list": lists["test"],
        }
    )
    assert (s.num_classes, s.train, s.val, s.test) == (365, 62_500, 7_300, 36_500)
    assert s.missing[0].startswith("image files: not checked (data.root: ")


def test_dry_run_sizes_of_inat_and_of_an_absent_image_folder(tmp_path):
    cats = [(10, "Ant"), (20, "Bee")]
    train = [(1, "a.jpg", 10), (2, "b.jpg", 10), (3, "c.jpg", 10), (4, "d.jpg", 20)]
    write_coco(tmp_path / "train.json", train, cats)
    write_coco(tmp_path / "val.json", [(9, "v.jpg", 20)], cats)
    s = data_summary(
        {
            "name": "inat2018",
            "root": str(tmp_path / "images"),
            "train_json": str(tmp_path / "train.json"),
            "val_json": str(tmp_path / "val.json"),
        }
    )
    # validation holds out 1 of Ant's 3 training images (2 stay; Bee's only one stays), test is val.json
    assert (s.num_classes, s.train, s.val, s.test) == (2, 3, 1, 1) and s.manifest_hash
    assert (s.class_counts, s.val_counts) == ([2, 1], [1, 0])
    folder = data_summary({"name": "image_folder", "root": str(tmp_path / "photos")})
    assert folder.num_classes is None and folder.missing == [
        f"classes and split sizes: counted from the images, which are not here (data.root: {tmp_path}/photos: "
        f"no such directory)"
    ]


def test_the_dry_runs_shot_groups_are_the_full_train_lists(tmp_path):
    """iNat's objective check counts the groups as the evaluation does: by the full train list."""
    spec, _, _ = inat_tree(tmp_path, train_counts=(8, 3, 1), val_counts=(1, 1, 1))
    s = data_summary(spec)
    assert s.shot_counts == [8, 3, 1] and s.class_counts == [5, 2, 1]
