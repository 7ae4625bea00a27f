"""A shard's image bytes -> pixels at the network's size, on the CPU or on a GPU (docs/design.md, "Geometry").

Schema v2 shards keep each source file's bytes (JPEG or PNG) and the geometry (`scale`, `window`); the pixels are
made when a row is read, always through `mrcnn.geometry.resize_image`:

    decode_image(data, device)                      bytes -> uint8 [3, H, W], the original pixels
    decode_resize(data, new_h, new_w, device)       bytes -> uint8 [3, new_h, new_w]
    decode_canvas(images, windows, size, device)    N rows' bytes -> uint8 [N, 3, S, S], top-left, zero padding
    loader_reads(image, data)                       whether preprocess may store a file's bytes as they are

JPEGs decode with torchvision's libjpeg-turbo on the CPU and with nvjpeg on a CUDA device (a JPEG nvjpeg refuses
falls back to the CPU); PNGs decode on the CPU. Importable without Ray, MLflow and pycocotools (GPU side).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg, decode_png

from mrcnn.geometry import resize_image

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageDecodeError(ValueError):
    """Stored image bytes that do not decode (not JPEG / PNG, truncated, corrupt)."""


def loader_reads(image: Image.Image, data: bytes) -> bool:
    """Whether `decode_image(data)` gives the pixels `pipelines.data.coco.load_image_rgb` made of this file.

    image: the PIL image opened from `data`. Kept as they are: 8-bit RGB or grayscale JPEGs, and 8-bit RGB or
    grayscale PNGs without transparency. Everything else (CMYK / YCCK JPEGs, 16-bit, palette or alpha PNGs, other
    formats) is converted by load_image_rgb in ways the decoders here do not copy, so preprocess re-encodes it.
    """
    if image.mode not in ("RGB", "L"):
        return False
    if image.format == "JPEG":
        return data[:3] == JPEG_MAGIC
    if image.format == "PNG":
        # IHDR is the first chunk: 8 signature bytes, length, "IHDR", width, height, then the bit depth at byte 24
        return data[:8] == PNG_MAGIC and len(data) > 24 and data[24] == 8 and "transparency" not in image.info
    return False


def _buffer(data: bytes | memoryview | np.ndarray) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy: frombuffer warns on bytes


def decode_image(data: bytes, device: str | torch.device = "cpu") -> Tensor:
    """JPEG or PNG bytes -> uint8 [3, H, W] RGB on `device` (grayscale replicated; EXIF orientation not applied,
    as load_image_rgb does not). ImageDecodeError when the bytes are neither or do not decode."""
    device = torch.device(device)
    head = bytes(data[:8])
    buf = _buffer(data)
    try:
        if head[:3] == JPEG_MAGIC:
            if device.type == "cuda":
                try:
                    return decode_jpeg(buf, mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass  # nvjpeg does not take every JPEG (arithmetic coding, some odd samplings): libjpeg does
            return decode_jpeg(buf, mode=ImageReadMode.RGB).to(device)
        if head == PNG_MAGIC:
            return decode_png(buf, mode=ImageReadMode.RGB).to(device)
    except RuntimeError as e:
        raise ImageDecodeError(f"image bytes do not decode: {e}") from e
    raise ImageDecodeError(f"image bytes are neither JPEG nor PNG (first bytes {head!r})")


def decode_resize(data: bytes, new_h: int, new_w: int, device: str | torch.device = "cpu") -> Tensor:
    """JPEG or PNG bytes -> uint8 [3, new_h, new_w] on `device`, resized by `mrcnn.geometry.resize_image`."""
    return resize_image(decode_image(data, device), new_h, new_w)


def window_size(window: Sequence[int] | np.ndarray | Tensor) -> tuple[int, int]:
    """(new_h, new_w) of the resized image from its window (x1, y1, x2, y2) in the padded frame."""
    x1, y1, x2, y2 = (int(v) for v in window)
    return y2 - y1, x2 - x1


def decode_canvas(images: Sequence[bytes], windows: Sequence[Sequence[int]] | np.ndarray | Tensor, image_size: int,
                  device: str | torch.device = "cpu") -> Tensor:
    """The `images` of a training / evaluation batch made on `device`: each row's stored bytes decoded, resized
    to its window and placed in the zero S x S canvas.

    images: N encoded images (the shard column `image`); windows: [N, 4] (x1, y1, x2, y2) padded px;
    returns uint8 [N, 3, S, S], S = image_size. What a training loop on a GPU calls instead of receiving
    decoded pixels from the CPU workers.
    """
    device = torch.device(device)
    out = torch.zeros((len(images), 3, image_size, image_size), dtype=torch.uint8, device=device)
    for i, (data, window) in enumerate(zip(images, windows, strict=True)):
        x1, y1 = int(window[0]), int(window[1])
        new_h, new_w = window_size(window)
        if x1 < 0 or y1 < 0 or x1 + new_w > image_size or y1 + new_h > image_size or new_h <= 0 or new_w <= 0:
            raise ValueError(f"window {list(map(int, window))} of image {i} is not inside the {image_size} px canvas")
        out[i, :, y1 : y1 + new_h, x1 : x1 + new_w] = decode_resize(data, new_h, new_w, device)
    return out
