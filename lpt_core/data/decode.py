"""Image decoding for every input path: TorchCodec (``torchcodec.decoders``: libjpeg-turbo, libpng,
libwebp on the CPU, nvJPEG on CUDA) for the formats it reads, PIL for the rest (BMP, TIFF, PPM/PGM)
and for any file TorchCodec refuses. TorchCodec gives the same pixels as PIL for JPEG and PNG
(tests/test_decode.py) and at least PIL's speed (benchmarks/input_pipeline.py, benchmarks/README.md);
it needs no system library for images (FFmpeg only for video, which nothing here reads). Where
TorchCodec cannot be loaded at all (``torchcodec_error()`` says why) everything is decoded by PIL.
A file neither can read fails with one line naming it.
"""

from __future__ import annotations

import functools
import io
import os
import re

import numpy as np
import torch
from PIL import Image

JPEG_MAGIC = (0xFF, 0xD8, 0xFF)


@functools.cache
def _torchcodec():
    """``torchcodec.decoders``, or the error that kept it from loading (e.g. a torch without CUDA
    libraries for its nvJPEG build)."""
    try:
        from torchcodec import decoders

        return decoders
    except Exception as exc:  # ImportError, or OSError/RuntimeError from its native libraries
        return exc


def torchcodec_error() -> str | None:
    """None when TorchCodec decodes here, else why not (one line)."""
    mod = _torchcodec()
    return None if not isinstance(mod, BaseException) else f"{type(mod).__name__}: {str(mod).splitlines()[0][:200]}"


def read_bytes(path: str | os.PathLike) -> torch.Tensor:
    """A file's bytes as a 1-D uint8 tensor (what the decoders and ``EncodedBatch`` take)."""
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


_SOURCE_PLACE = re.compile(r"^\w+, \S+\.(?:cpp|h|hpp):\d+, ")  # TorchCodec's "function, file.cpp:208, "


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {_SOURCE_PLACE.sub('', text[0])[:120] if text else ''}"


def _pil(source) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        source = io.BytesIO(source.numpy().tobytes())
    with Image.open(source) as im:
        rgb = np.asarray(im.convert("RGB"))  # [H, W, 3]
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def decode_rgb(source: str | os.PathLike | torch.Tensor, where: str | None = None) -> torch.Tensor:
    """A uint8 RGB image [3, H, W] on the CPU from a path or an encoded 1-D uint8 tensor; ``where``
    names it in the error (default: the path)."""
    where = where or str(source)
    codec, tried = _torchcodec(), None
    if not isinstance(codec, BaseException):
        try:
            img = codec.decode_image(source if isinstance(source, torch.Tensor) else os.fspath(source), mode="RGB")
            return img[0] if img.dim() == 4 else img  # an animated file: its first frame
        except (RuntimeError, ValueError) as exc:
            tried = exc  # a format TorchCodec does not read (BMP, TIFF, PPM), or a file it refuses
    try:
        return _pil(source)
    except Exception as exc:
        detail = _first_line(exc) + (f"; TorchCodec {_first_line(tried)}" if tried else "")
        raise ValueError(f"{where}: unreadable image ({detail})") from exc


def decode_batch(data: list[torch.Tensor], paths: list[str], device: torch.device) -> list[torch.Tensor]:
    """uint8 RGB images [3, h, w] on ``device`` from encoded CPU bytes: JPEGs in one TorchCodec call
    (one nvJPEG batch on CUDA); anything else, or a batch with a file that call refuses, one by one,
    so the bad file is named."""
    codec = _torchcodec()
    if not isinstance(codec, BaseException) and all(d[:3].tolist() == list(JPEG_MAGIC) for d in data):
        try:
            return list(codec.decode_jpeg(list(data), mode="RGB", device=device))
        except (RuntimeError, ValueError):
            pass  # a bad or unusual file: decode one by one below to name it
    return [decode_rgb(d, path).to(device, non_blocking=True) for d, path in zip(data, paths)]
