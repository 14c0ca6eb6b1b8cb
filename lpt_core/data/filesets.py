"""Datasets of image files: Places-LT / ImageNet-LT (split lists), iNaturalist 2018 (COCO-style
JSON) and a folder of class sub-folders, each from its typed spec (``specs``). ``gpu_decode: true``
yields encoded bytes that ``BatchTransform`` decodes on the device (see ``common.assemble``)."""

from __future__ import annotations

from .common import assemble, class_perm, data_file, data_root, input_mode, lt_targets
from .files import FileImages, check_counts, check_labels, file_splits, read_coco, read_list, read_names, scan_folder
from .transforms import RELEASED

MIN_TRAIN_LEFT = 2  # iNat's hold-out never leaves a class fewer training images than this


def build_list_dataset(s, input_cfg=RELEASED):
    """``places_lt`` / ``imagenet_lt``: ``root`` + ``train_list``/``val_list``/``test_list`` of
    ``relative/path label`` lines (list files: absolute, relative to root, else to the working
    directory; image paths: relative to root); class names from an
    optional ``class_names`` file (one per line), else ``class_{i}`` for 0..max train label."""
    root, mode = data_root(s), input_mode(s, "gpu_decode")
    train, val, test = (read_list(data_file(s, k, root)) for k in ("train_list", "val_list", "test_list"))
    names_file = data_file(s, "class_names", root)
    names = read_names(names_file) if names_file else None
    num_classes = len(names) if names else max(train.labels) + 1
    for entries in (train, val, test):
        check_labels(entries, num_classes)
    check_counts(train, num_classes)
    names = names or [f"class_{i}" for i in range(num_classes)]
    return assemble(*file_splits(root, train, val, test), names, s.image_size, mode, input_cfg=input_cfg)


def build_inat(s, input_cfg=RELEASED):
    """``inat2018``: ``root`` + ``train_json``/``val_json`` (COCO-style). The official val list is
    the test split (what the long-tail literature reports); validation is a class-stratified
    hold-out of the train list: per class a seeded shuffle gives up to ``val_per_class`` images,
    never leaving the class fewer than ``MIN_TRAIN_LEFT`` (2) training images (a class of n images
    gives at most n - 2; classes of 2 or 1 give none and go unvalidated, named in
    ``info["val_missing_classes"]``), and the rest trains: ``class_counts`` (A-GCL, the sampler)
    count what stays in train, the shot groups the full train list (``info["shot_counts"]``, the
    literature's groups). Labels index the train categories sorted by id; names are the category names."""
    root, mode = data_root(s), input_mode(s, "gpu_decode")
    listed, categories, names = read_coco(data_file(s, "train_json", root))
    test, _, _ = read_coco(data_file(s, "val_json", root), categories)
    check_counts(listed, len(names))
    by_class = [[] for _ in names]
    for i, y in enumerate(listed.labels):
        by_class[y].append(i)
    val_idx = []
    for c, idx in enumerate(by_class):
        held = min(s.val_per_class, max(0, len(idx) - MIN_TRAIN_LEFT))
        val_idx += [idx[j] for j in class_perm(s.seed, c, len(idx))[:held]]
    held_out = set(val_idx)
    train = listed.subset([i for i in range(len(listed.paths)) if i not in held_out])
    val = listed.subset(sorted(val_idx))
    return assemble(
        *file_splits(root, train, val, test),
        names,
        s.image_size,
        mode,
        {"val_per_class": s.val_per_class, "shot_counts": [len(idx) for idx in by_class]},
        input_cfg=input_cfg,
    )


def build_image_folder(s, input_cfg=RELEASED):
    """``image_folder``: ``root/<class>/<images>`` (classes in sorted order). Per class a seeded
    shuffle holds out ``test_per_class`` then ``val_per_class`` images (default 20 each; a class
    needs more than their sum); with ``imbalance_ratio`` the rest is cut to the LT profile over
    the classes ranked by image count (n_max = the largest), else all of it trains."""
    root, mode = data_root(s), input_mode(s, "gpu_decode")
    ratio, per_val, per_test = s.imbalance_ratio, s.val_per_class, s.test_per_class
    entries, classes = scan_folder(root)
    by_class = [[] for _ in classes]
    for i, y in enumerate(entries.labels):
        by_class[y].append(i)
    held = per_val + per_test
    for c, idx in enumerate(by_class):
        if len(idx) <= held:
            raise ValueError(
                f"data.val_per_class: class folder '{classes[c]}' has {len(idx)} images; "
                f"it needs more than val_per_class + test_per_class = {held}"
            )
    orders = [[idx[j] for j in class_perm(s.seed, c, len(idx))] for c, idx in enumerate(by_class)]
    counts = lt_targets([len(order) - held for order in orders], ratio)
    parts = {"train": [], "val": [], "test": []}
    for c, order in enumerate(orders):
        parts["test"] += order[:per_test]
        parts["val"] += order[per_test:held]
        parts["train"] += order[held : held + counts[c]]
    train, val, test = (FileImages(root, entries.subset(sorted(parts[k]))) for k in parts)
    return assemble(
        train,
        val,
        test,
        classes,
        s.image_size,
        mode,
        {"imbalance_ratio": ratio, "val_per_class": per_val, "test_per_class": per_test},
        input_cfg=input_cfg,
    )
