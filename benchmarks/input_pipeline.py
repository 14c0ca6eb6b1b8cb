"""Input-pipeline throughput (images/s): the CPU DataLoader path with 0 and 2 workers for the
synthetic set, a CIFAR-format set and a JPEG folder it writes to a temp dir; the on-device paths
(gpu_augment on uint8 batches, gpu_decode on JPEG bytes) on CPU, and on CUDA when there is one.

    python benchmarks/input_pipeline.py [--batch-size 32] [--batches 6] [--image-size 224] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lpt_core.data import build_dataset  # noqa: E402
from lpt_core.trainer import make_loader, to_device  # noqa: E402


def write_cifar100(root: str, per_class: int = 50, classes: int = 100) -> None:
    """torchvision's CIFAR-100 pickle layout with random pixels."""
    base = os.path.join(root, "cifar-100-python")
    os.makedirs(base)
    rng = np.random.default_rng(0)
    for name, n in (("train", per_class), ("test", 10)):
        labels = rng.permutation(np.repeat(np.arange(classes), n)).tolist()
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), b"fine_labels": labels}, f)
    with open(os.path.join(base, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(classes)]}, f)


def write_jpegs(root: str, classes: int = 8, per_class: int = 40, size=(320, 240)) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"))
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize(size).save(os.path.join(root, f"class{c}", f"{i}.jpg"), quality=90)


def measure(data, device: torch.device, workers: int, batch_size: int, batches: int) -> float:
    """images/s over ``batches`` batches after one warm-up batch (worker start-up not counted)."""
    loader = make_loader(data.train, device, workers, batch_size=batch_size, shuffle=True, drop_last=True)
    it, seen = iter(loader), 0
    for k in range(batches + 1):
        if k == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        try:
            images, labels = next(it)
        except StopIteration:
            it = iter(loader)
            images, labels = next(it)
        images, _ = to_device(images, labels, device, data.train_batch_transform)
        seen += images.shape[0] if k else 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar100(os.path.join(tmp, "cifar"))
        write_jpegs(os.path.join(tmp, "jpeg"))
        size = {"image_size": args.image_size}
        sets = {
            "synthetic": (
                {"name": "synthetic", "num_classes": 100, "max_per_class": 50, "image_size": 32, "seed": 0},
                "gpu_augment",
            ),
            "cifar100_lt": (
                {
                    "name": "cifar100_lt",
                    "root": os.path.join(tmp, "cifar"),
                    "imbalance_ratio": 10,
                    "val_per_class": 5,
                    **size,
                },
                "gpu_augment",
            ),
            "image_folder": (
                {
                    "name": "image_folder",
                    "root": os.path.join(tmp, "jpeg"),
                    "val_per_class": 2,
                    "test_per_class": 2,
                    **size,
                },
                "gpu_decode",
            ),
        }
        for name, (spec, gpu_key) in sets.items():
            data = build_dataset(spec)
            for workers in (0, 2):
                rows.append(
                    (
                        name,
                        "cpu transforms",
                        "cpu",
                        workers,
                        measure(data, devices[0], workers, args.batch_size, args.batches),
                    )
                )
            data = build_dataset({**spec, gpu_key: True})
            for device in devices:
                rows.append((name, gpu_key, device.type, 0, measure(data, device, 0, args.batch_size, args.batches)))
    print(
        f"input pipeline, batch {args.batch_size}, {args.batches} batches, output "
        f"{args.image_size}px (synthetic: 32px), torch threads {torch.get_num_threads()}"
    )
    print(f"{'dataset':<14}{'path':<16}{'device':<8}{'workers':>8}{'images/s':>12}")
    for name, path, device, workers, ips in rows:
        print(f"{name:<14}{path:<16}{device:<8}{workers:>8}{ips:>12.0f}")
    if args.out:
        keys = ("dataset", "path", "device", "workers", "images_per_s")
        with open(args.out, "w") as f:
            json.dump(
                {
                    "batch_size": args.batch_size,
                    "batches": args.batches,
                    "image_size": args.image_size,
                    "results": [dict(zip(keys, row)) for row in rows],
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
