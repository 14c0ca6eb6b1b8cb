"""Decoding on TorchCodec: the same pixels as PIL for JPEG and PNG, PIL for the formats TorchCodec
does not read, a bad file named in one line, batched JPEG decoding (nvJPEG's call on CUDA) equal to
one by one, and no deprecated torchvision.io decoder anywhere in the code."""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lpt_core.data import decode
from lpt_core.data.decode import decode_batch, decode_rgb, read_bytes, torchcodec_error

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def picture(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC).convert(mode)


def pil_pixels(path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def test_torchcodec_decodes_here():
    assert torchcodec_error() is None
    assert not isinstance(decode._torchcodec(), BaseException)


@pytest.mark.parametrize("fmt, suffix", [("JPEG", "jpg"), ("PNG", "png")])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_torchcodec_gives_pils_pixels(tmp_path, fmt, suffix, mode):
    path = tmp_path / f"x.{suffix}"
    picture(500, 375, mode=mode).save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    for source in (path, read_bytes(path)):
        img = decode_rgb(source)
        assert img.dtype == torch.uint8 and img.shape == (3, 375, 500)
        assert torch.equal(img, pil_pixels(path))


@pytest.mark.parametrize("fmt, suffix", [("BMP", "bmp"), ("TIFF", "tif"), ("PPM", "ppm")])
def test_formats_torchcodec_does_not_read_fall_back_to_pil(tmp_path, fmt, suffix):
    path = tmp_path / f"x.{suffix}"
    picture(64, 48).save(path, fmt)
    with pytest.raises(ValueError, match="Unsupported or unrecognized image format"):
        decode._torchcodec().decode_image(str(path), mode="RGB")  # what the fallback is for
    img = decode_rgb(path)
    assert img.shape == (3, 48, 64) and torch.equal(img, pil_pixels(path))


def test_a_bad_file_is_named_in_one_line(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG" * 4)
    with pytest.raises(ValueError) as info:
        decode_rgb(bad)
    message = str(info.value)
    assert re.match(
        rf"^{re.escape(str(bad))}: unreadable image \(OSError: .*; TorchCodec RuntimeError: Skipped over .*\)$", message
    )
    assert "\n" not in message
    with pytest.raises(ValueError, match=r"^images\[3\]: unreadable image"):
        decode_rgb(read_bytes(bad), "images[3]")


@pytest.mark.parametrize("device", DEVICES)
def test_batched_jpeg_decoding_equals_one_by_one_and_names_a_bad_file(tmp_path, device):
    paths = []
    for i, (w, h) in enumerate([(256, 256), (500, 375), (320, 240)]):
        paths.append(tmp_path / f"{i}.jpg")
        picture(w, h, seed=i).save(paths[-1], "JPEG", quality=90)
    data = [read_bytes(p) for p in paths]
    images = decode_batch(data, [str(p) for p in paths], torch.device(device))
    assert [tuple(img.shape) for img in images] == [(3, 256, 256), (3, 375, 500), (3, 240, 320)]
    assert all(img.device.type == device for img in images)
    if device == "cpu":  # nvJPEG's IDCT may differ from libjpeg-turbo's by a grey level
        assert all(torch.equal(img, pil_pixels(p)) for img, p in zip(images, paths))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(paths[1].read_bytes()[:200])
    data[1] = read_bytes(truncated)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(truncated))}: unreadable image \("):
        decode_batch(data, [str(paths[0]), str(truncated), str(paths[2])], torch.device(device))


def test_no_deprecation_warning_and_no_torchvision_io_decoder_in_the_code(tmp_path):
    path = tmp_path / "x.jpg"
    picture(64, 48).save(path, "JPEG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_rgb(path)
        decode_batch([read_bytes(path)], [str(path)], torch.device("cpu"))
    users = [
        str(f.relative_to(ROOT))
        for folder in ("lpt_core", "tune")
        for f in (ROOT / folder).rglob("*.py")
        if "torchvision.io" in f.read_text()
    ]
    assert users == []
