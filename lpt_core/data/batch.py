"""The on-device input path: augment (and decode) a whole batch where it lives.

``BatchTransform`` takes a uint8 batch [B, 3, H, W] or an ``EncodedBatch`` of JPEG/PNG bytes
(decoded by TorchCodec, nvJPEG on CUDA: ``decode``), and
does LPT's transforms as crop boxes: train = RandomResizedCrop (torchvision's parameter rule,
scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip, eval = resize to size / crop_pct (a square,
or the short side: ``eval_resize``) and center-crop (``transforms.InputConfig``). Bilinear: one ``roi_align``
(aligned, adaptive sampling: bilinear when upsampling, area-averaging when downsampling)
resamples every box; bicubic: torchvision's antialiased resized crop per image. Images are then
normalised with the config's mean and std. Crop parameters come from torch's global CPU
generator, so the trainer's saved RNG state covers them. Works on CPU and CUDA.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from .decode import decode_batch
from .transforms import RELEASED, InputConfig


class EncodedBatch:
    """Encoded images packed in one 1-D uint8 CPU tensor (image i = ``buffer[offsets[i]:offsets[i+1]]``;
    one storage crosses the worker queue) and their paths. ``.to(device)`` only records the
    device: decoders read the bytes from CPU memory and write the pixels on ``device``."""

    def __init__(self, buffer: torch.Tensor, offsets: list[int], paths: list[str], device=torch.device("cpu")):
        self.buffer, self.offsets, self.paths, self.device = buffer, offsets, paths, torch.device(device)

    @classmethod
    def pack(cls, data: list[torch.Tensor], paths: list[str]) -> EncodedBatch:
        offsets = [0]
        for d in data:
            offsets.append(offsets[-1] + d.numel())
        return cls(torch.cat(data) if data else torch.empty(0, dtype=torch.uint8), offsets, paths)

    @property
    def data(self) -> list[torch.Tensor]:
        return [self.buffer[a:b] for a, b in zip(self.offsets, self.offsets[1:])]

    @property
    def shape(self) -> torch.Size:
        return torch.Size([len(self.paths)])

    def __len__(self) -> int:
        return len(self.paths)

    def to(self, device, non_blocking: bool = False) -> EncodedBatch:
        return EncodedBatch(self.buffer, self.offsets, self.paths, device)

    def pin_memory(self, device=None) -> EncodedBatch:
        return self

    def decode(self) -> list[torch.Tensor]:
        """uint8 RGB images [3, h, w] on ``self.device``: TorchCodec, in one nvJPEG call on CUDA
        (``decode.decode_batch``)."""
        return decode_batch(self.data, self.paths, self.device)


def collate_encoded(batch: list) -> tuple[EncodedBatch, torch.Tensor]:
    """DataLoader collate for datasets that yield ``((bytes, path), label)``."""
    return (
        EncodedBatch.pack([item[0][0] for item in batch], [item[0][1] for item in batch]),
        torch.tensor([item[1] for item in batch], dtype=torch.long),
    )


def random_resized_boxes(
    hw: torch.Tensor, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries: int = 10, generator: torch.Generator | None = None
) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for every image at once: ``hw`` [B, 2] float
    heights and widths -> boxes [B, 4] (x1, y1, x2, y2) in pixels."""
    b = hw.shape[0]
    height, width = hw[:, :1], hw[:, 1:]
    area = height * width * torch.empty(b, tries).uniform_(*scale, generator=generator)
    aspect = torch.exp(torch.empty(b, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = ok.int().argmax(dim=1, keepdim=True)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(dim=1)
    height, width = height[:, 0], width[:, 0]
    # fallback: the whole image, clamped to the ratio range, centred
    in_ratio = width / height
    fw = torch.where(in_ratio > ratio[1], (height * ratio[1]).round(), width)
    fh = torch.where(in_ratio < ratio[0], (width / ratio[0]).round(), height)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(b, 2, generator=generator)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).floor(), ((height - h) / 2).floor())
    left = torch.where(found, (u[:, 1] * (width - w + 1)).floor(), ((width - w) / 2).floor())
    return torch.stack([left, top, left + w, top + h], dim=1)


def center_boxes(hw: torch.Tensor, size: int, resized: int, square: bool = False) -> torch.Tensor:
    """torchvision's Resize(resized) (short side; ``square``: Resize((resized, resized))) +
    CenterCrop(size), as a box in the original image (same output sizes and rounding)."""
    height, width = hw[:, 0], hw[:, 1]
    if square:
        new_h = new_w = torch.full_like(height, resized)
    else:
        short = torch.minimum(height, width)
        new_h = torch.where(height == short, resized, (resized * height / short).floor())
        new_w = torch.where(width == short, resized, (resized * width / short).floor())
    top, left = ((new_h - size) / 2).round(), ((new_w - size) / 2).round()
    sy, sx = height / new_h, width / new_w
    return torch.stack([left * sx, top * sy, (left + size) * sx, (top + size) * sy], dim=1)


class BatchTransform(torch.nn.Module):
    """LPT's train (``train=True``) or eval transform on a uint8 batch or an ``EncodedBatch``;
    returns float32 [B, 3, size, size] normalised with ``cfg``'s mean and std on the batch's device."""

    def __init__(self, size: int, train: bool, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), cfg: InputConfig = RELEASED):
        super().__init__()
        self.size, self.train_mode, self.scale, self.ratio, self.cfg = size, train, scale, ratio, cfg
        # (x / 255 - mean) / std as one multiply and one subtract (mean/std 0.5: x * 2/255 - 1)
        self.register_buffer("mul", 1.0 / (255.0 * torch.tensor(cfg.std)).view(3, 1, 1), persistent=False)
        self.register_buffer("sub", (torch.tensor(cfg.mean) / torch.tensor(cfg.std)).view(3, 1, 1), persistent=False)

    def boxes(self, hw: torch.Tensor) -> torch.Tensor:
        if self.train_mode:
            return random_resized_boxes(hw, self.scale, self.ratio)
        return center_boxes(hw, self.size, self.cfg.resize_size(self.size), self.cfg.eval_resize == "square")

    def resample(self, images) -> torch.Tensor:
        """Bicubic (or any torchvision mode): the crop and resize of torchvision, image by image."""
        mode, out = self.cfg.mode(), []
        if isinstance(images, torch.Tensor):
            images = list(images)
        hw = torch.tensor([img.shape[-2:] for img in images], dtype=torch.float32)
        boxes = random_resized_boxes(hw, self.scale, self.ratio).long().tolist() if self.train_mode else None
        for i, img in enumerate(images):
            if boxes is not None:
                left, top, right, bottom = boxes[i]
                img = TF.resized_crop(
                    img, top, left, bottom - top, right - left, [self.size] * 2, interpolation=mode, antialias=True
                )
            else:
                img = TF.center_crop(
                    TF.resize(img, self.cfg.eval_resize_to(self.size), interpolation=mode, antialias=True),
                    [self.size] * 2,
                )
            out.append(img.float())
        return torch.stack(out)

    def forward(self, images) -> torch.Tensor:
        if isinstance(images, EncodedBatch):
            images = images.decode()
        out_size = (self.size, self.size)
        if self.cfg.interpolation != "bilinear":
            out = self.resample(images)
            device = out.device
        elif isinstance(images, torch.Tensor):  # one size: one roi_align for the whole batch
            b, _, h, w = images.shape
            device = images.device
            boxes = self.boxes(torch.tensor([[h, w]], dtype=torch.float32).expand(b, 2))
            rois = torch.cat([torch.arange(b, dtype=torch.float32)[:, None], boxes], dim=1)
            out = roi_align(images.float(), rois.to(device, non_blocking=True), out_size, 1.0, -1, True)
        else:  # decoded images of different sizes: one box each
            device = images[0].device
            hw = torch.tensor([img.shape[-2:] for img in images], dtype=torch.float32)
            rois = torch.cat([torch.zeros(len(images), 1), self.boxes(hw)], dim=1).to(device)
            out = torch.cat(
                [roi_align(img[None].float(), rois[i : i + 1], out_size, 1.0, -1, True) for i, img in enumerate(images)]
            )
        if self.train_mode:
            flip = (torch.rand(out.shape[0]) < 0.5).to(device, non_blocking=True)
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out.mul_(self.mul.to(device)).sub_(self.sub.to(device))

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, train={self.train_mode}, {self.cfg.interpolation}, crop_pct={self.cfg.crop_pct:g}, "
            f"eval_resize={self.cfg.eval_resize}"
        )
