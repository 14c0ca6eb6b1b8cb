"""Classify images with a trained LPT: its config, the backbone and prompts it needs, the eval
preprocessing, and the top-k classes with their probabilities. torch + timm only.

A classifier config (``classifier_config``, a JSON-able dict) says everything besides the prompt
file: the backbone spec (name,
weights, timm overrides) and the seed of a random backbone, the LPT shape, the class names, the
image size and normalisation of the eval transform, and the cosine-logit scale of the loss (the
probabilities are ``softmax(scale * cosine)``). Images may be encoded bytes, file paths, PIL images,
uint8 tensors [3, H, W] (any size: resized and center-cropped like the test split), or a float batch
[B, 3, S, S] already normalised as the dataset yields it.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .backbones import build_backbone_from_spec
from .checkpoint import load_prompts
from .data import transforms
from .data.decode import decode_rgb
from .model import LPT
from .trainer import predict_batches, resolve_device

CONFIG_FORMAT = "lpt-classifier"


def classifier_config(
    backbone: dict,
    backbone_seed: int,
    model: dict,
    class_names: Sequence[str],
    image_size: int,
    logit_scale: float,
    input_cfg: transforms.InputConfig,
    data: dict | None = None,
    shot_split: str = "standard",
) -> dict[str, Any]:
    """The JSON-able description of a trained LPT (everything but its prompt file): ``input_cfg``
    is the input pipeline it was trained with (``backbones.input_config``; stored as
    ``normalisation``), ``shot_split`` how its data's shot groups are counted (``metrics``)."""
    return {
        "format": CONFIG_FORMAT,
        "backbone": dict(backbone),
        "backbone_seed": int(backbone_seed),
        "model": dict(model),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "image_size": int(image_size),
        "normalisation": input_cfg.to_dict(),
        "logit_scale": float(logit_scale),
        "data": dict(data or {}),
        "shot_split": shot_split,
    }


def raw_split(dataset):
    """A shallow copy of a split that yields its images undecoded by transforms (PIL or uint8
    tensors, never encoded bytes), so a classifier can preprocess them itself."""
    raw = copy.copy(dataset)
    raw.transform = None
    if hasattr(raw, "encoded"):
        raw.encoded = False
    return raw


def image_id(dataset, index: int, split: str) -> str:
    """The file of image ``index`` of a split, or ``split/index`` for images made in memory."""
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        return os.path.join(getattr(dataset, "root", ""), paths[index])
    return f"{split}/{index}"


def png_bytes(image) -> bytes:
    """A PIL image or uint8 tensor [3, H, W] as PNG bytes (an input example of the model)."""
    if isinstance(image, torch.Tensor):
        image = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    return out.getvalue()


class LPTClassifier:
    """A phase-2 LPT in eval mode with its preprocessing and class names."""

    def __init__(self, model: LPT, config: dict, device: torch.device):
        self.model, self.config, self.device = model.set_phase(2).eval().to(device), config, device
        self.image_size = config["image_size"]
        self.class_names = config["class_names"]
        self.scale = config["logit_scale"]
        norm = transforms.InputConfig.from_dict(config["normalisation"], where="normalisation")
        self.transform = transforms.test_transform(self.image_size, norm)

    # ----------------------------------------------------------------------------- input
    def load_image(self, item, where: str):
        """One image as PIL or uint8 tensor: bytes and paths are decoded as the datasets decode them
        (``data.decode.decode_rgb``: TorchCodec, PIL for the formats it does not read)."""
        if isinstance(item, (str, os.PathLike)):
            path = Path(item).expanduser()
            if not path.is_file():
                raise ValueError(f"{where}: {item}: no such image file")
            item = path.read_bytes()
            where = f"{where}: {path}"
        if isinstance(item, (bytes, bytearray, memoryview)):
            try:
                return decode_rgb(torch.frombuffer(bytearray(item), dtype=torch.uint8), where)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        if isinstance(item, Image.Image):
            return item.convert("RGB")
        if isinstance(item, torch.Tensor):
            if item.dim() != 3 or item.shape[0] != 3 or item.dtype != torch.uint8:
                raise ValueError(f"{where}: expected a uint8 image [3, H, W], got {item.dtype} {list(item.shape)}")
            return item
        raise ValueError(
            f"{where}: not an image (expected bytes, a path, a PIL image or a uint8 "
            f"tensor [3, H, W], got {type(item).__name__})"
        )

    def preprocess_one(self, item, where: str = "image") -> torch.Tensor:
        """One image as the model's float input [3, S, S]."""
        return self.transform(self.load_image(item, where))

    def preprocess(self, images) -> torch.Tensor:
        """A batch [B, 3, S, S]: a normalised float batch as is, a uint8 batch or a sequence of
        images through the eval transform."""
        size = self.image_size
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            if images.dtype == torch.uint8:
                return torch.stack([self.preprocess_one(img, f"images[{i}]") for i, img in enumerate(images)])
            if images.is_floating_point():
                if tuple(images.shape[1:]) != (3, size, size):
                    raise ValueError(
                        f"images: a float batch must be normalised [B, 3, {size}, {size}] "
                        f"(uint8 images of any size are resized), got {list(images.shape)}"
                    )
                return images.float()
            raise ValueError(f"images: expected uint8 or float, got {images.dtype}")
        if isinstance(images, torch.Tensor):
            raise ValueError(f"images: expected a batch [B, 3, H, W], got {list(images.shape)}")
        items = list(images)
        if not items:
            raise ValueError("images: no images given")
        return torch.stack([self.preprocess_one(item, f"images[{i}]") for i, item in enumerate(items)])

    # ----------------------------------------------------------------------------- output
    def top_classes(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], k: int
    ) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For each ``(images, labels)`` batch: (indices [B, k], probabilities [B, k], argmax [B],
        labels [B]) on the CPU; ``k`` is capped at the number of classes."""
        k = max(1, min(int(k), len(self.class_names)))
        for logits, labels, _ in predict_batches(self.model, batches, self.device):
            probs = torch.softmax(self.scale * logits.float(), dim=1)
            p, idx = probs.topk(k, dim=1)
            yield idx.cpu(), p.cpu(), logits.argmax(dim=1), labels

    def predict(self, images, k: int = 5, batch_size: int = 64) -> list[dict]:
        """Per image: ``class_index``, ``class_name`` and ``probability`` of its top-k classes,
        best first."""
        x = self.preprocess(images)
        batches = (
            (x[i : i + batch_size], torch.zeros(len(x[i : i + batch_size]), dtype=torch.long))
            for i in range(0, len(x), batch_size)
        )
        out = []
        for idx, p, _, _ in self.top_classes(batches, k):
            out += [
                {
                    "class_index": row.tolist(),
                    "class_name": [self.class_names[c] for c in row.tolist()],
                    "probability": [float(v) for v in prob],
                }
                for row, prob in zip(idx, p)
            ]
        return out


def build_classifier(
    config: dict, prompt_file: str | os.PathLike, weights: str | None = None, device: str | torch.device | None = "auto"
) -> LPTClassifier:
    """The backbone (timm: pretrained cache, local file ``weights`` overriding the config's, or a
    random one from its seed) plus the prompts. Errors are one-line ValueErrors naming what is wrong."""
    if config.get("format") != CONFIG_FORMAT:
        raise ValueError(f"model config: not an LPT classifier config (format {config.get('format')!r})")
    spec = dict(config["backbone"])
    if weights:
        spec["weights"] = weights
    with torch.random.fork_rng(devices=[]):  # a random backbone is fixed by its seed; leave the caller's RNG
        torch.manual_seed(config["backbone_seed"])
        backbone = build_backbone_from_spec(spec)
        model = LPT(backbone, config["num_classes"], **config["model"])
    load_prompts(model, prompt_file)
    return LPTClassifier(model, config, resolve_device(device))
