"""The server's way in: an HTTP request's body, content type and query -> a decoded image and its options, or a
`RequestError` (an HTTP status and a message naming the problem). Plain functions, importable and testable without
Ray or FastAPI.

Accepted bodies: the image itself (Content-Type image/jpeg or image/png), or multipart/form-data with the image in
the field `image`. The image is decoded by `pipelines.data.coco.decode_image_bytes`, the decoder of preprocess and
predict: grayscale, CMYK, palette, 16-bit and alpha images are converted to RGB as they are there, and an image of
more pixels than the limit is refused from its header, before its pixels are decoded (a decompression bomb).
"""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP

import numpy as np

from pipelines.data.coco import decode_image_bytes
from pipelines.data.errors import ImageError, ImageTooLargeError

IMAGE_TYPES = ("image/jpeg", "image/png")
MULTIPART = "multipart/form-data"
FIELD = "image"  # the multipart field holding the image


class RequestError(Exception):
    """A bad request: `status` (4xx) and a message naming the problem, sent as {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def check_query(score_threshold: float | None, max_detections: int | None) -> None:
    """The query parameters' ranges: score_threshold in [0, 1], max_detections >= 0."""
    if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:  # NaN fails here too
        raise RequestError(422, f"score_threshold: {score_threshold} is outside [0, 1]")
    if max_detections is not None and max_detections < 0:
        raise RequestError(422, f"max_detections: {max_detections} is negative")


def image_bytes(body: bytes, content_type: str | None) -> bytes:
    """The image's bytes from a request body: the body itself for image/jpeg and image/png, the field `image` of a
    multipart/form-data body; RequestError 415 for another content type, 400 for a body without an image."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in IMAGE_TYPES:
        data = body
    elif kind == MULTIPART:
        data = multipart_field(body, content_type or "", FIELD)
    else:
        raise RequestError(415, f"content type {kind or '(none)'!r} is not accepted: send {' or '.join(IMAGE_TYPES)} "
                                f"as the body, or {MULTIPART} with the image in the field {FIELD!r}")
    if not data:
        raise RequestError(400, "empty body: no image bytes" if kind != MULTIPART else f"field {FIELD!r} is empty")
    return data


def multipart_field(body: bytes, content_type: str, name: str) -> bytes:
    """The bytes of the form field `name` of a multipart/form-data body (the standard library's MIME parser)."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                  + body)
    if not message.is_multipart():
        raise RequestError(400, f"not a {MULTIPART} body (no boundary?)")
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == name:
            return part.get_payload(decode=True) or b""
    raise RequestError(400, f"{MULTIPART} body without the field {name!r}")


def decode_request(body: bytes, content_type: str | None, *, max_pixels: int) -> np.ndarray:
    """A request's image, decoded to [H, W, 3] uint8 RGB: 413 over the pixel limit, 400 for bytes that are not an
    image or a truncated / corrupt one."""
    data = image_bytes(body, content_type)
    try:
        return decode_image_bytes(data, "the request's image", max_pixels=max_pixels).pixels
    except ImageTooLargeError as exc:
        raise RequestError(413, str(exc)) from exc
    except ImageError as exc:
        raise RequestError(400, str(exc)) from exc
