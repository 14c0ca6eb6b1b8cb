"""Input-pipeline throughput (images/s), in two tables.

Decoders: images/s per CPU core (one thread) of PIL, torchvision.io and TorchCodec decoding JPEGs
it writes at real sizes (256x256 as Places365, 500x375 as ImageNet, 800x600 as iNat), alone and
with the training transform (RandomResizedCrop 224 + flip + normalise, as a loader worker runs
it); on CUDA, batched decoding of the same files (nvJPEG through torchvision.io and TorchCodec).
Loaders: the CPU DataLoader path with 0 and 2 workers for the synthetic set, a CIFAR-format set
and a JPEG folder it writes to a temp dir; the on-device paths (gpu_augment on uint8 batches,
gpu_decode on JPEG bytes) on CPU, and on CUDA when there is one.

    python benchmarks/input_pipeline.py [--batch-size 32] [--batches 6] [--image-size 224]
                                        [--decode-images 64] [--rounds 5] [--skip-loaders] [--out r.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lpt_core.data import build_dataset  # noqa: E402
from lpt_core.data.transforms import train_transform  # noqa: E402
from lpt_core.trainer import make_loader, to_device  # noqa: E402

SIZES = {"places365 256x256": (256, 256), "imagenet 500x375": (500, 375), "inat 800x600": (800, 600)}


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


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Smooth shapes plus grain: JPEGs of about the size photos have at quality 90 (a file of pure
    noise decodes slower than a photo, a flat one faster)."""
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC
    )
    grain = rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(base, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def jpeg_bytes(size: tuple[int, int], n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` JPEG files' bytes as 1-D uint8 tensors (what a loader reads from disk)."""
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        buf = io.BytesIO()
        photo_like(rng, size).save(buf, "JPEG", quality=90)
        out.append(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
    return out


def decoders() -> dict:
    """name -> (decode bytes to a uint8 [3, H, W] tensor or a PIL image, batched CUDA decode or None)."""
    from torchcodec.decoders import decode_jpeg as codec_jpeg
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_jpeg

    def pil(data: torch.Tensor):
        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            return im.convert("RGB")

    rgb = ImageReadMode.RGB
    return {
        "PIL": (pil, None),
        "torchvision.io": (
            lambda d: tv_jpeg(d, mode=rgb),
            lambda ds: tv_jpeg(list(ds), mode=rgb, device="cuda"),
        ),
        "TorchCodec": (
            lambda d: codec_jpeg(d, mode="RGB"),
            lambda ds: codec_jpeg(list(ds), mode="RGB", device="cuda"),
        ),
    }


def best_rates(fns: dict, items: list, rounds: int) -> dict:
    """images/s of each ``fns[key]`` over ``items``: the best of ``rounds`` passes after a warm-up
    pass, the functions taking turns within each round (in a rotating order), so that other work on
    the machine slows them alike; the best pass is the one least disturbed."""
    keys, best = list(fns), dict.fromkeys(fns, float("inf"))
    for r in range(rounds + 1):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            start = time.perf_counter()
            for item in items:
                fns[key](item)
            if r:
                best[key] = min(best[key], time.perf_counter() - start)
    return {key: len(items) / seconds for key, seconds in best.items()}


def measure_decoders(n_images: int, image_size: int, rounds: int = 5) -> list[tuple]:
    """(size, decoder, what, device, images/s, mean file KB) rows: per core on the CPU (one torch
    thread, in this process), batched on CUDA."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transform = train_transform(image_size)
    rows = []
    try:
        for size_name, size in SIZES.items():
            files = jpeg_bytes(size, n_images)
            kb = sum(f.numel() for f in files) / len(files) / 1000
            fns = {}
            for name, (decode, _) in decoders().items():
                fns[name, "decode"] = decode
                fns[name, "decode + train transform"] = lambda d, decode=decode: transform(decode(d))
            for (name, what), rate in best_rates(fns, files, rounds).items():
                rows.append((size_name, name, what, "cpu, per core", rate, kb))
            for name, (_, batched) in decoders().items():
                if batched is not None and torch.cuda.is_available():
                    batched(files)  # warm-up: nvJPEG's handles and buffers
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(rounds):
                        batched(files)
                    torch.cuda.synchronize()
                    rate = rounds * len(files) / (time.perf_counter() - start)
                    rows.append((size_name, name, f"decode, batches of {len(files)}", "cuda", rate, kb))
        # CIFAR and synthetic sets hold uint8 images in memory: no decoding, the transform only
        images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for _ in range(n_images)]
        rate = best_rates({"transform": transform}, images, rounds)["transform"]
        rows.append(("cifar 32x32 in memory", "(none)", "train transform", "cpu, per core", rate, 0.0))
    finally:
        torch.set_num_threads(threads)
    return rows


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
    p.add_argument("--decode-images", type=int, default=64, help="JPEGs per size for the decoder table")
    p.add_argument("--rounds", type=int, default=5, help="timed passes per decoder (the best counts)")
    p.add_argument("--skip-loaders", action="store_true", help="only the decoder table")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    with warnings.catch_warnings():  # torchvision 0.29 warns that its decoders are deprecated: measured on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        decode_rows = measure_decoders(args.decode_images, args.image_size, args.rounds)
    print(
        f"decoders: {args.decode_images} JPEGs per size (quality 90), train transform to {args.image_size}px, "
        f"best of {args.rounds} passes, one torch thread"
    )
    print(f"{'images':<23}{'decoder':<16}{'what':<28}{'device':<15}{'images/s':>10}{'file KB':>9}")
    for size_name, name, what, device, ips, kb in decode_rows:
        print(f"{size_name:<23}{name:<16}{what:<28}{device:<15}{ips:>10.0f}{kb:>9.0f}")
    rows = [] if args.skip_loaders else measure_loaders(args)
    if rows:
        print(
            f"\ninput pipeline, batch {args.batch_size}, {args.batches} batches, output "
            f"{args.image_size}px (synthetic: 32px), torch threads {torch.get_num_threads()}"
        )
        print(f"{'dataset':<14}{'path':<16}{'device':<8}{'workers':>8}{'images/s':>12}")
        for name, path, device, workers, ips in rows:
            print(f"{name:<14}{path:<16}{device:<8}{workers:>8}{ips:>12.0f}")
    if args.out:
        keys = ("dataset", "path", "device", "workers", "images_per_s")
        decode_keys = ("images", "decoder", "what", "device", "images_per_s", "file_kb")
        with open(args.out, "w") as f:
            json.dump(
                {
                    "batch_size": args.batch_size,
                    "batches": args.batches,
                    "image_size": args.image_size,
                    "decoders": [dict(zip(decode_keys, row)) for row in decode_rows],
                    "results": [dict(zip(keys, row)) for row in rows],
                },
                f,
                indent=2,
            )
    return 0


def measure_loaders(args) -> list[tuple]:
    """(dataset, path, device, workers, images/s) of each loader path."""
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
    return rows


if __name__ == "__main__":
    sys.exit(main())
