"""Decoding and resizing shard images on a device (pipelines/data/images.py, mrcnn/geometry.py): the device's path
against the CPU path, on the CPU always and on CUDA where present (tests/support/devices.py: the cuda cases carry
the `gpu` marker). Imports only torch, torchvision, numpy and PIL (the GPU machine has no Ray, MLflow or
pycocotools)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn.geometry import resize_image
from pipelines.data.images import decode_canvas, decode_image, decode_resize
from tests.support.devices import DEVICES


def _encoded(fmt: str, h: int = 480, w: int = 640, seed: int = 0, gray: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    pixels = np.stack([xx % 256, yy % 256, (3 * xx + yy) % 256], -1) + rng.integers(-25, 26, (h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    (img.convert("L") if gray else img).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("device", DEVICES)
def test_resize_on_the_device_is_the_cpu_resize_within_one_grey_level(device):
    image = decode_image(_encoded("PNG", 300, 400))  # [3, 300, 400] on the CPU
    for new_h, new_w in ((480, 640), (150, 200), (301, 399)):
        cpu = resize_image(image, new_h, new_w)
        out = resize_image(image.to(device), new_h, new_w)
        assert out.device.type == device.type and out.dtype == torch.uint8 and out.shape == cpu.shape
        assert (out.cpu().int() - cpu.int()).abs().max() <= 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gray", [False, True])
def test_decode_and_resize_on_the_device_stay_close_to_the_cpu_path(gray, device):
    """On CUDA, nvjpeg decodes the JPEG."""
    data = _encoded("JPEG", gray=gray)
    cpu = decode_resize(data, 768, 1024, "cpu")
    out = decode_resize(data, 768, 1024, device)
    assert out.device.type == device.type and out.shape == (3, 768, 1024)
    diff = (out.cpu().float() - cpu.float()).abs()
    assert diff.mean() < 2  # nvjpeg is not libjpeg-turbo bit for bit (torchvision's own bound)
    if gray:
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


@pytest.mark.parametrize("device", DEVICES)
def test_a_png_decodes_on_the_cpu_and_moves_exactly(device):
    data = _encoded("PNG", 50, 70)
    out = decode_image(data, device)
    assert out.device.type == device.type and torch.equal(out.cpu(), decode_image(data))


@pytest.mark.parametrize("device", DEVICES)
def test_decode_canvas_on_the_device_matches_the_cpu_canvas(device):
    blobs = [_encoded("JPEG", 480, 640, 1), _encoded("JPEG", 640, 480, 2), _encoded("PNG", 100, 90, 3)]
    windows = [[0, 0, 1024, 768], [0, 0, 768, 1024], [0, 0, 922, 1024]]
    cpu = decode_canvas(blobs, windows, 1024, "cpu")
    out = decode_canvas(blobs, windows, 1024, device)
    assert out.device.type == device.type and out.shape == (3, 3, 1024, 1024)
    assert (out.cpu().float() - cpu.float()).abs().mean() < 2
    assert out[0, :, 768:].max() == 0 and out[1, :, :, 768:].max() == 0 and out[2, :, :, 922:].max() == 0
