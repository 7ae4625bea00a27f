"""Whether a COCO record is well-formed: the checks `coco.read_split` makes on each image and annotation record.

What counts as well-formed: ids are JSON integers (not booleans) in int64 range; an image's height and width
are positive integers, at most 2**20 each and under 2**29 pixels in all (what pycocotools' masks and run lengths
hold); `iscrowd` is absent, 0 or 1 (or a JSON boolean); a polygon part has >= 3 finite (x, y) points, none
farther outside the image than the image's own size; an RLE has `size` [height, width] as integers and
`counts` that cover exactly height * width pixels (a list of non-negative integers, or a string in
pycocotools' compressed format).
"""

from __future__ import annotations

import math
from typing import Any

_MAX_SIDE = 2**20  # pixels per image side: polygon points (x 5, in C ints) stay far from overflowing
_MAX_PIXELS = 2**29  # pixels per image: the longest run pycocotools' compressed RLE reader decodes exactly


def skip_report(image_id: Any, file: Any, annotation_id: Any, reason: str, action: str = "skipped") -> dict[str, Any]:
    """One entry of a skip report (read_split's and the row maker's): the image or annotation, the reason (a slug,
    ': ', the detail) and what was done ("skipped" or "repaired")."""
    return {"image_id": image_id, "file": file, "annotation_id": annotation_id, "reason": reason, "action": action}


def is_int(v: Any) -> bool:
    """A JSON integer, not a boolean, in int64 range (what the shards' Arrow columns hold)."""
    return type(v) is int and -(2**63) <= v < 2**63


def is_number(v: Any) -> bool:
    """A finite int or float, not a boolean (ints too large for a float are not numbers here)."""
    if type(v) not in (int, float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def short(v: Any, n: int = 60) -> str:
    """`repr(v)` cut to `n` characters, for a skip reason."""
    text = repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


def rle_string_counts(s: str) -> list[int] | None:
    """Run lengths of a compressed COCO RLE string (pycocotools' `rleFrString`), None when it is not one.

    pycocotools' C reader trusts its input: characters outside '0'..'o', a string ending inside a number or a
    number of more than 6 characters read past the string or overflow. Checked here instead, in Python.
    """
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n or k >= 6:
                return None
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def check_segmentation(seg: Any, height: int, width: int) -> tuple[Any, str | None, str | None]:
    """(segmentation to keep or None, skip reason, repair reason)."""
    if isinstance(seg, list):
        parts = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                 and all(is_number(v) for v in p)]
        if not parts:
            return None, f"degenerate_polygon: no polygon with >= 3 points among {len(seg)} part(s)", None
        # pycocotools rasterises a polygon along its whole outline: far-off points cost memory without bound
        if not all(-width <= x <= 2 * width for p in parts for x in p[0::2]) or \
                not all(-height <= y <= 2 * height for p in parts for y in p[1::2]):
            return None, (f"malformed_segmentation: polygon points farther outside the {width}x{height} image "
                          "than its size"), None
        if len(parts) < len(seg):
            return parts, None, f"degenerate_polygon: dropped {len(seg) - len(parts)} of {len(seg)} part(s)"
        return seg, None, None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)
                and size == [height, width]):
            return None, f"malformed_segmentation: RLE size {short(size)} is not the image's [{height}, {width}]", \
                None
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                return None, "malformed_segmentation: uncompressed RLE counts do not cover the image", None
        elif isinstance(counts, str):
            runs = rle_string_counts(counts)
            if runs is None:
                return None, "malformed_segmentation: RLE counts string is not compressed RLE", None
            if any(r < 0 for r in runs) or sum(runs) != height * width:
                return None, "malformed_segmentation: compressed RLE counts do not cover the image", None
        else:
            return None, "malformed_segmentation: RLE counts neither str nor list", None
        return seg, None, None
    return None, f"malformed_segmentation: {type(seg).__name__} is neither polygons nor RLE", None


def image_problem(img: Any) -> str | None:
    """Why an image record is malformed, or None."""
    if not isinstance(img, dict):
        return f"record is a {type(img).__name__}, not an object"
    height, width = img.get("height"), img.get("width")
    if not (is_int(img.get("id")) and isinstance(img.get("file_name"), str) and is_int(height)
            and is_int(width) and height > 0 and width > 0):
        return "needs int id, str file_name, positive int height/width"
    if max(height, width) > _MAX_SIDE or height * width >= _MAX_PIXELS:
        return f"{width}x{height} is beyond 2**20 pixels a side or 2**29 in all"
    return None
