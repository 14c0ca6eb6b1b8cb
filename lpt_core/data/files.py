"""Image files on disk: the dataset that reads them, and the readers of list files, COCO-style JSON
and class sub-folders. Readers check everything cheap at build time (format, label range, that
each image file exists) and name the file, and the line where there is one. Inside
``images_unchecked()`` the image files and the image root are not looked for: a dry run reads the
split sizes from the lists on a machine without the images."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from dataclasses import dataclass

from torch.utils.data import Dataset

from .batch import collate_encoded
from .decode import decode_rgb, read_bytes

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_CHECK_IMAGES = contextvars.ContextVar("lpt_check_images", default=True)


@contextlib.contextmanager
def images_unchecked():
    """Build datasets without looking for their image files or image root (lists are still read
    and checked): the splits know their paths and labels, and reading an image fails."""
    token = _CHECK_IMAGES.set(False)
    try:
        yield
    finally:
        _CHECK_IMAGES.reset(token)


def images_checked() -> bool:
    return _CHECK_IMAGES.get()


@dataclass
class Entries:
    """Images of one split: ``paths`` as written in the source (relative to root, or absolute),
    ``labels``, ``ids`` (the image's id in the source), ``where[i]`` names its line for errors."""

    paths: list[str]
    labels: list[int]
    ids: list[int]
    source: str
    lines: list[int] | None = None

    def where(self, i: int) -> str:
        return f"{self.source}:{self.lines[i]}" if self.lines else self.source

    def subset(self, idx) -> Entries:
        pick = lambda xs: [xs[i] for i in idx]
        return Entries(
            pick(self.paths), pick(self.labels), pick(self.ids), self.source, pick(self.lines) if self.lines else None
        )


class FileImages(Dataset):
    """Images ``root/paths[i]`` with ``labels[i]``: decoded to uint8 RGB tensors (``decode.decode_rgb``:
    TorchCodec, PIL for what it does not read) through ``transform``, or with
    ``encoded=True`` the raw file bytes as ``((uint8 1-D tensor, path), label)`` for
    ``collate_encoded`` (exposed as ``collate_fn``) and an on-device decoder."""

    def __init__(self, root: str, entries: Entries, transform=None, encoded: bool = False):
        self.root, self.paths, self.labels, self.ids = root, entries.paths, entries.labels, entries.ids
        self.transform, self.encoded = transform, encoded

    @property
    def collate_fn(self):
        return collate_encoded if self.encoded else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        path = os.path.join(self.root, self.paths[index])
        if self.encoded:
            try:
                return (read_bytes(path), path), self.labels[index]
            except OSError as exc:
                raise ValueError(f"{path}: unreadable image ({type(exc).__name__}: {exc.strerror or exc})") from exc
        img = decode_rgb(path)  # a ValueError naming the file when nothing reads it
        return (self.transform(img) if self.transform else img), self.labels[index]


def read_list(path: str) -> Entries:
    """A file of ``relative/path label`` lines (blank lines skipped)."""
    paths, labels, lines = [], [], []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.strip().rsplit(None, 1)
                if not parts:
                    continue
                try:
                    labels.append(int(parts[1]))
                except (IndexError, ValueError):
                    raise ValueError(f"{path}:{n}: expected 'relative/path label', got {line.strip()[:80]!r}") from None
                paths.append(parts[0])
                lines.append(n)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    if not paths:
        raise ValueError(f"{path}: no entries")
    return Entries(paths, labels, list(range(len(paths))), path, lines)


def read_names(path: str) -> list[str]:
    """Class names, one per line (line i names class i)."""
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f]
    while names and not names[-1]:
        names.pop()
    if not names or "" in names:
        raise ValueError(f"{path}:{names.index('') + 1 if '' in names else 1}: empty class name")
    return names


def read_coco(path: str, categories: dict[int, int] | None = None):
    """COCO-style JSON (images[{id, file_name}], annotations[{image_id, category_id}],
    categories[{id, name}]) -> (Entries, {category id: label}, class names). Labels index the
    categories sorted by id; pass ``categories`` to map another split with the train mapping."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    try:
        names = {} if categories else {int(c["id"]): str(c["name"]) for c in doc["categories"]}
        annotations = [(int(a["image_id"]), int(a["category_id"])) for a in doc["annotations"]]
        images = [(int(im["id"]), str(im["file_name"])) for im in doc["images"]]
    except KeyError as exc:
        raise ValueError(f"{path}: malformed COCO-style JSON (missing key {exc})") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: malformed COCO-style JSON ({exc})") from None
    categories = categories or {cid: i for i, cid in enumerate(sorted(names))}
    label_of = {}
    for k, (image_id, category_id) in enumerate(annotations):
        if category_id not in categories:
            raise ValueError(f"{path}: annotations[{k}]: category_id {category_id} is not a train category")
        label_of[image_id] = categories[category_id]
    paths, labels, ids = [], [], []
    for k, (image_id, file_name) in enumerate(images):
        if image_id not in label_of:
            raise ValueError(f"{path}: images[{k}]: image id {image_id} has no annotation")
        paths.append(file_name)
        labels.append(label_of[image_id])
        ids.append(image_id)
    if not paths:
        raise ValueError(f"{path}: no images")
    return Entries(paths, labels, ids, path), categories, [names[c] for c in sorted(names)]


def scan_folder(root: str) -> tuple[Entries, list[str]]:
    """Images under ``root/<class>/`` (class folders sorted by name, files sorted, recursive);
    ``ids`` are positions in that listing."""
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"data.root: {root}: no class sub-folders")
    paths, labels = [], []
    for c, name in enumerate(classes):
        found = sorted(
            os.path.relpath(os.path.join(d, f), root)
            for d, _, files in os.walk(os.path.join(root, name), followlinks=True)
            for f in files
            if f.lower().endswith(IMG_EXTENSIONS)
        )
        if not found:
            raise ValueError(f"data.root: {os.path.join(root, name)}: class folder holds no images")
        paths += found
        labels += [c] * len(found)
    return Entries(paths, labels, list(range(len(paths))), root), classes


def check_labels(entries: Entries, num_classes: int) -> None:
    bad = next((i for i, y in enumerate(entries.labels) if not 0 <= y < num_classes), None)
    if bad is not None:
        raise ValueError(f"{entries.where(bad)}: label {entries.labels[bad]} outside 0..{num_classes - 1}")


def check_files(root: str, entries: Entries) -> None:
    """Every image file exists (existence only: cheap); the error names the first missing one."""
    if not images_checked():
        return
    isfile = os.path.isfile
    missing = [i for i, p in enumerate(entries.paths) if not isfile(os.path.join(root, p))]
    if missing:
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        i = missing[0]
        raise FileNotFoundError(f"{entries.where(i)}: {os.path.join(root, entries.paths[i])}: no such image file{more}")


def check_counts(entries: Entries, num_classes: int) -> list[int]:
    """Training images per class; every class needs at least one."""
    counts = [0] * num_classes
    for y in entries.labels:
        counts[y] += 1
    if 0 in counts:
        raise ValueError(f"{entries.source}: class {counts.index(0)} has no training images")
    return counts


def file_splits(root: str, train: Entries, val: Entries, test: Entries):
    """Check files exist; the three FileImages."""
    for e in (train, val, test):
        check_files(root, e)
    return FileImages(root, train), FileImages(root, val), FileImages(root, test)
