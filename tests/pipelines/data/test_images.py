"""pipelines/data/images.py: which source files are stored as they are, and that their bytes decode to the pixels
preprocess saw (PIL through load_image_rgb is the independent reference); decode + resize + canvas (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn.geometry import resize_image
from pipelines.data.coco import read_image
from pipelines.data.images import ImageDecodeError, decode_canvas, decode_image, decode_resize, window_size


def _photo(h: int = 37, w: int = 53, seed: int = 0) -> np.ndarray:
    """[h, w, 3] uint8 with gradients and noise (odd sizes: chroma subsampling edges)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx * 3 + yy) % 256], axis=-1)
    return np.clip(base + rng.integers(-30, 31, (h, w, 3)), 0, 255).astype(np.uint8)


def _save(img: Image.Image, path, fmt: str, **kwargs) -> bytes:
    img.save(path, fmt, **kwargs)
    return path.read_bytes()


def _sources(tmp_path) -> dict[str, tuple[bytes, bool]]:
    """name -> (file bytes, whether the loader reads them as they are)."""
    rgb = Image.fromarray(_photo())
    gray = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    gray_t = gray.copy()
    gray_t.info["transparency"] = 0
    i16 = Image.fromarray((np.asarray(gray, np.uint16) * 257).astype(np.uint16))
    out = {}
    for name, img, fmt, kwargs, kept in [
        ("rgb.jpg", rgb, "JPEG", {"quality": 90}, True),
        ("progressive.jpg", rgb, "JPEG", {"quality": 90, "progressive": True}, True),
        ("gray.jpg", gray, "JPEG", {}, True),
        ("rgb.png", rgb, "PNG", {}, True),
        ("gray.png", gray, "PNG", {}, True),
        ("cmyk.jpg", rgb.convert("CMYK"), "JPEG", {}, False),
        ("palette.png", rgb.convert("P"), "PNG", {}, False),
        ("rgba.png", rgba, "PNG", {}, False),
        ("gray_transparent.png", gray_t, "PNG", {"transparency": 0}, False),
        ("gray16.png", i16, "PNG", {}, False),
        ("rgb.bmp", rgb, "BMP", {}, False),
        ("rgb.gif", rgb, "GIF", {}, False),
    ]:
        out[name] = (_save(img, tmp_path / name, fmt, **kwargs), kept)
    return out


def test_kept_sources_decode_to_the_pixels_preprocess_saw_and_the_rest_are_not_kept(tmp_path):
    for name, (data, kept) in _sources(tmp_path).items():
        source = read_image(tmp_path / name)
        assert source.data == data
        assert source.loader_reads == kept, name
        if kept:
            got = decode_image(data)  # [3, H, W]
            assert got.dtype == torch.uint8 and got.shape == (3, 37, 53), name
            assert np.array_equal(got.permute(1, 2, 0).numpy(), source.pixels), name


def test_a_sixteen_bit_png_would_not_decode_to_the_same_pixels():
    """Why gray16.png is re-encoded: decoded as it is, its samples are not load_image_rgb's (or not uint8)."""
    gray = np.asarray(Image.fromarray(_photo()).convert("L"), np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray * 257 + 128).save(buf, "PNG")
    try:
        got = decode_image(buf.getvalue())
    except ImageDecodeError:
        return
    assert got.dtype != torch.uint8 or not np.array_equal(got[0].numpy(), gray)


def test_decode_resize_is_decode_then_the_shared_resize():
    buf = io.BytesIO()
    Image.fromarray(_photo()).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    expected = resize_image(decode_image(data), 59, 85)
    assert torch.equal(decode_resize(data, 59, 85), expected)
    assert torch.equal(decode_resize(data, 37, 53), decode_image(data))  # already at size: no resampling


def test_decode_canvas_places_each_image_top_left_on_zeros():
    a, b = _photo(37, 53, 1), _photo(20, 30, 2)
    blobs = []
    for pixels in (a, b):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        blobs.append(buf.getvalue())
    windows = torch.tensor([[0, 0, 64, 45], [0, 0, 30, 20]])
    got = decode_canvas(blobs, windows, 64)
    assert got.shape == (2, 3, 64, 64) and got.dtype == torch.uint8
    assert torch.equal(got[0, :, :45, :64], resize_image(torch.from_numpy(a).permute(2, 0, 1).contiguous(), 45, 64))
    assert got[0, :, 45:].max() == 0
    assert torch.equal(got[1, :, :20, :30], torch.from_numpy(b).permute(2, 0, 1))  # PNG at size: exact
    assert got[1, :, 20:].max() == 0 and got[1, :, :, 30:].max() == 0
    assert window_size([0, 0, 64, 45]) == (45, 64)
    with pytest.raises(ValueError, match="not inside the 64 px canvas"):
        decode_canvas(blobs[:1], [[0, 0, 65, 45]], 64)


def test_bytes_that_are_not_an_image_or_are_cut_short_raise_image_decode_error():
    buf = io.BytesIO()
    Image.fromarray(_photo()).save(buf, "JPEG")
    with pytest.raises(ImageDecodeError, match="neither JPEG nor PNG"):
        decode_image(b"GIF89a......")
    with pytest.raises(ImageDecodeError):
        decode_image(buf.getvalue()[:200])
    png = io.BytesIO()
    Image.fromarray(_photo()).save(png, "PNG")
    with pytest.raises(ImageDecodeError):
        decode_image(png.getvalue()[:100])
