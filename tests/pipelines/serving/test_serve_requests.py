"""The server's way in without a server: bodies and content types, the multipart field, the query ranges, the pixel
limit read from the header, and a batch in which one request fails (the others answered as if alone)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mrcnn.config import shapes
from mrcnn.model import build_model
from pipelines.evaluation.inference import detect_images, eager_runner
from pipelines.serving.app import answer_batch
from pipelines.serving.options import ServeOptionError, ServeOptions
from pipelines.serving.requests import RequestError, check_query, decode_request, image_bytes
from tests.support.http import multipart


def _png(size=(40, 30), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG")
    return out.getvalue()


def _status(call) -> tuple[int, str]:
    with pytest.raises(RequestError) as info:
        call()
    return info.value.status, info.value.message


def test_the_body_or_the_multipart_field_and_nothing_else():
    png = _png()
    assert image_bytes(png, "image/png") == png
    assert image_bytes(png, "Image/JPEG; charset=binary") == png  # the media type alone counts, any case
    body, kind = multipart({"other": ("x.txt", b"hello", "text/plain"), "image": ("a.png", png, "image/png")})
    assert image_bytes(body, kind) == png
    assert _status(lambda: image_bytes(png, "application/octet-stream"))[0] == 415
    assert _status(lambda: image_bytes(b"", "image/png")) == (400, "empty body: no image bytes")
    body, kind = multipart({"image": ("a.png", b"", "image/png")})
    assert _status(lambda: image_bytes(body, kind)) == (400, "field 'image' is empty")
    assert _status(lambda: image_bytes(b"junk", "multipart/form-data"))[0] == 400  # no boundary


def test_query_ranges():
    check_query(0.0, 0)
    check_query(1.0, None)
    check_query(None, 5)
    assert _status(lambda: check_query(1.01, None)) == (422, "score_threshold: 1.01 is outside [0, 1]")
    assert _status(lambda: check_query(math.nan, None))[0] == 422
    assert _status(lambda: check_query(None, -1)) == (422, "max_detections: -1 is negative")


def test_the_pixel_limit_is_read_from_the_header_before_decoding():
    """A 8000 x 8000 PNG of one colour is a few kB that would decode to 192 MB: refused from its size (and one past
    PIL's own bomb limit, twice its MAX_IMAGE_PIXELS, is refused as too large too)."""
    bomb = _png((8000, 8000), "1")
    assert len(bomb) < 100_000
    status, message = _status(lambda: decode_request(bomb, "image/png", max_pixels=1_000_000))
    assert status == 413 and "8000 x 8000 = 64000000 pixels, more than the limit 1000000" in message
    huge = _png((20000, 20000), "1")
    assert _status(lambda: decode_request(huge, "image/png", max_pixels=10**12))[0] == 413
    assert decode_request(_png((1000, 1000)), "image/png", max_pixels=1_000_000).shape == (1000, 1000, 3)


def test_serve_options_are_checked_naming_the_option():
    assert ServeOptions.parse_autoscale("1:4") == (1, 4)
    for kwargs, words in [({"replicas": 0}, "--replicas 0"), ({"autoscale": (3, 1)}, "--autoscale 3:1"),
                          ({"port": 70000}, "--port 70000"), ({"batch_wait_ms": -1}, "--batch-wait-ms -1")]:
        with pytest.raises(ServeOptionError, match=words):
            ServeOptions("ckpt", **kwargs)
    options = ServeOptions("ckpt", overrides=("detection.min_confidence=0.2",), autoscale=(0, 2))
    assert ServeOptions.from_args(options.to_args()) == options
    with pytest.raises(ServeOptionError, match="unknown serve args"):
        ServeOptions.from_args({"model_path": "ckpt", "replica": 2})


def test_a_request_the_model_cannot_take_fails_alone_in_its_batch(one_thread):
    """A batch with an image so thin that it resizes to 0 rows: the model call fails, each request is rerun alone,
    the thin one gets 422 naming the cause and the others exactly their answers alone."""
    torch.manual_seed(0)
    model = build_model(shapes().override(["detection.min_confidence=0.0"]), num_classes=4).eval()  # as served
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 256, (60 + 10 * i, 80, 3), dtype=np.uint8) for i in range(2)]
    thin = np.zeros((1, 2000, 3), np.uint8)

    def run(requests):
        return detect_images(eager_runner(model, torch.device("cpu")), [r[0] for r in requests],
                             image_ids=[0] * len(requests), min_dim=128,
                             max_dim=128, coco_ids=[1, 2, 3],
                             min_scores=[r[1] for r in requests], limits=[r[2] for r in requests])

    requests = [(good[0], 0.0, 20), (thin, 0.0, 20), (good[1], 0.0, 5)]
    answers = answer_batch(run, requests)
    assert answers[1]["status"] == 422 and "size must be positive" in answers[1]["error"]
    for i in (0, 2):
        assert answers[i] == {"results": run([requests[i]])[0], "batch": 3}
    assert answers[0]["results"] and len(answers[2]["results"]) == 5  # detections there, and the limit applied
    whole = answer_batch(run, [requests[0], requests[2]])
    assert [a["results"] for a in whole] == [answers[0]["results"], answers[2]["results"]]  # batched = alone
