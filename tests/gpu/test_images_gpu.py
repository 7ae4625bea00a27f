"""Decoding and resizing shard images on a CUDA device (pipelines/data/images.py, mrcnn/geometry.py): the GPU
path against the CPU path. Marker `gpu`: skipped without CUDA. Imports only torch, torchvision, numpy and PIL
(the GPU machine has no Ray, MLflow or pycocotools)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn.geometry import resize_image
from pipelines.data.images import decode_canvas, decode_image, decode_resize

pytestmark = pytest.mark.gpu


def _encoded(fmt: str, h: int = 480, w: int = 640, seed: int = 0, gray: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    pixels = np.stack([xx % 256, yy % 256, (3 * xx + yy) % 256], -1) + rng.integers(-25, 26, (h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    (img.convert("L") if gray else img).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_resize_on_the_gpu_is_the_cpu_resize_within_one_grey_level():
    image = decode_image(_encoded("PNG", 300, 400))  # [3, 300, 400] on the CPU
    for new_h, new_w in ((480, 640), (150, 200), (301, 399)):
        cpu = resize_image(image, new_h, new_w)
        gpu = resize_image(image.cuda(), new_h, new_w)
        assert gpu.device.type == "cuda" and gpu.dtype == torch.uint8 and gpu.shape == cpu.shape
        assert (gpu.cpu().int() - cpu.int()).abs().max() <= 1


@pytest.mark.parametrize("gray", [False, True])
def test_nvjpeg_decode_and_resize_stay_close_to_the_cpu_path(gray):
    data = _encoded("JPEG", gray=gray)
    cpu = decode_resize(data, 768, 1024, "cpu")
    gpu = decode_resize(data, 768, 1024, "cuda")
    assert gpu.device.type == "cuda" and gpu.shape == (3, 768, 1024)
    diff = (gpu.cpu().float() - cpu.float()).abs()
    assert diff.mean() < 2  # nvjpeg is not libjpeg-turbo bit for bit (torchvision's own bound)
    if gray:
        assert torch.equal(gpu[0], gpu[1]) and torch.equal(gpu[1], gpu[2])


def test_a_png_decodes_on_the_cpu_and_moves_exactly():
    data = _encoded("PNG", 50, 70)
    assert torch.equal(decode_image(data, "cuda").cpu(), decode_image(data))


def test_decode_canvas_on_the_gpu_matches_the_cpu_canvas():
    blobs = [_encoded("JPEG", 480, 640, 1), _encoded("JPEG", 640, 480, 2), _encoded("PNG", 100, 90, 3)]
    windows = [[0, 0, 1024, 768], [0, 0, 768, 1024], [0, 0, 922, 1024]]
    cpu = decode_canvas(blobs, windows, 1024, "cpu")
    gpu = decode_canvas(blobs, windows, 1024, "cuda")
    assert gpu.device.type == "cuda" and gpu.shape == (3, 3, 1024, 1024)
    assert (gpu.cpu().float() - cpu.float()).abs().mean() < 2
    assert gpu[0, :, 768:].max() == 0 and gpu[1, :, :, 768:].max() == 0 and gpu[2, :, :, 922:].max() == 0
