"""The record checks one at a time (pipelines/data/coco_checks.py): every limit met exactly and passed by one,
run lengths against pycocotools' own encoder. Pure Python: test_fuzz_records and test_record_regressions reach
the same checks through `read_split`."""

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from pipelines.data.coco_checks import check_segmentation, image_problem, is_int, is_number, rle_string_counts, short

H, W = 20, 10  # not square: a check that swaps height and width fails


def _mask(runs, h, w):
    """The mask whose column-major run lengths (0s first) are `runs`."""
    return np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8).reshape((h, w), order="F")


def _rle_chars(runs):
    """pycocotools' rleToString in Python: deltas from the run two back after the third, 5-bit groups, sign bit."""
    out = []
    for i, x in enumerate(runs):
        x -= runs[i - 2] if i > 2 else 0
        more = True
        while more:
            c, x = x & 0x1F, x >> 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def test_is_int_is_a_json_integer_in_int64_range():
    assert is_int(0) and is_int(-(2**63)) and is_int(2**63 - 1)
    assert not any(is_int(v) for v in (2**63, -(2**63) - 1, True, 1.0, "1", None))


def test_is_number_is_a_finite_int_or_float():
    assert is_number(0) and is_number(-2.5) and is_number(2**1023)
    assert not any(is_number(v) for v in (True, float("nan"), float("inf"), float("-inf"), "1", None, 2**1024))


def test_short_cuts_the_repr_to_n_characters():
    assert short("a" * 58) == repr("a" * 58)  # 60 characters: kept
    assert short("a" * 59) == "'" + "a" * 56 + "..." and len(short("a" * 59)) == 60
    assert short([1, 2, 3], n=5) == "[1..."


@pytest.mark.parametrize("runs", [[3, 4, 2, 1, 190], [0, 200], [150, 1, 2, 40, 1, 2, 4], [1] * 200])
def test_run_lengths_of_pycocotools_strings(runs):
    # decreasing runs give negative deltas; 150 needs two 5-bit groups
    h, w = H, W
    text = mask_utils.encode(np.asfortranarray(_mask(runs, h, w)))["counts"].decode()
    assert text == _rle_chars(runs)  # the helper writes what pycocotools writes
    assert rle_string_counts(text) == runs


def test_run_lengths_of_long_numbers_and_strings_that_are_not_rle():
    # six characters hold 30 bits with the sign: runs up to 2**29 - 1 (under the 2**29 pixels an image may have)
    assert rle_string_counts(_rle_chars([2**29 - 1, 5, 2**20, 7])) == [2**29 - 1, 5, 2**20, 7]
    assert rle_string_counts(_rle_chars([2**29])) is None
    assert rle_string_counts("`````0") == [16 * (1 + 2**5 + 2**10 + 2**15 + 2**20)]  # six characters: the most
    assert rle_string_counts("``````0") is None  # seven
    assert rle_string_counts("P") is None  # ends inside a number (continuation bit set)
    assert rle_string_counts("0~") is None and rle_string_counts("0 ") is None  # outside '0'..'o'
    assert rle_string_counts("p") is None and rle_string_counts("/") is None  # just past either end
    assert rle_string_counts("O") == [-1] and rle_string_counts("") == []


def test_polygons_need_three_finite_points_and_keep_what_has_them():
    triangle = [0, 0, 5, 0, 0, 5]
    assert check_segmentation([triangle], H, W) == ([triangle], None, None)
    for bad in ([0, 0, 5, 0], [0, 0, 5, 0, 0, 5, 1], [0, 0, 5, 0, 0, float("nan")], [0, 0, 5, 0, 0, True], "x"):
        kept, skip, repair = check_segmentation([bad], H, W)
        assert kept is None and repair is None
        assert skip == "degenerate_polygon: no polygon with >= 3 points among 1 part(s)"
    assert check_segmentation([triangle, [1, 2]], H, W) == (
        [triangle], None, "degenerate_polygon: dropped 1 of 2 part(s)")


def test_polygon_points_as_far_outside_as_the_image_size_and_no_farther():
    at_the_limit = [-W, -H, 2 * W, -H, 2 * W, 2 * H]
    assert check_segmentation([at_the_limit], H, W) == ([at_the_limit], None, None)
    reason = f"malformed_segmentation: polygon points farther outside the {W}x{H} image than its size"
    for i, step in ((0, -0.5), (2, 0.5), (1, -0.5), (5, 0.5)):
        beyond = list(at_the_limit)
        beyond[i] += step
        assert check_segmentation([beyond], H, W) == (None, reason, None)
    # an x as far as the height (but not the width) allows is outside
    assert check_segmentation([[2 * H, 0, 0, 0, 0, 5]], H, W)[1] == reason


def test_rle_size_is_the_images_own():
    counts = [H * W]
    assert check_segmentation({"size": [H, W], "counts": counts}, H, W)[1:] == (None, None)
    for size in ([W, H], [H, W, 1], [True, W], (H, W), [float(H), W]):
        assert check_segmentation({"size": size, "counts": counts}, H, W) == (
            None, f"malformed_segmentation: RLE size {short(size)} is not the image's [{H}, {W}]", None)


def test_uncompressed_counts_cover_the_image_exactly():
    def skip(counts):
        return check_segmentation({"size": [H, W], "counts": counts}, H, W)[1]

    assert skip([100, 0, 100]) is None
    reason = "malformed_segmentation: uncompressed RLE counts do not cover the image"
    assert skip([100, 101]) == reason and skip([100, 99]) == reason
    assert skip([201, -1]) == reason and skip([True, 199]) == reason


def test_compressed_counts_cover_the_image_exactly():
    def skip(counts):
        return check_segmentation({"size": [H, W], "counts": counts}, H, W)[1]

    assert skip(_rle_chars([150, 50])) is None
    assert skip(_rle_chars([0, 200])) is None  # a zero-length first run: the mask starts with a foreground pixel
    assert skip(_rle_chars([150, 51])) == "malformed_segmentation: compressed RLE counts do not cover the image"
    assert skip(_rle_chars([201, -1])) == "malformed_segmentation: compressed RLE counts do not cover the image"
    assert skip("``````0") == "malformed_segmentation: RLE counts string is not compressed RLE"
    assert skip(200) == "malformed_segmentation: RLE counts neither str nor list"
    assert check_segmentation({"counts": [200]}, H, W)[1] == (
        "malformed_segmentation: dict is neither polygons nor RLE")


def test_image_records_need_ids_names_and_a_positive_size():
    good = {"id": 1, "file_name": "a.jpg", "height": H, "width": W}
    assert image_problem(good) is None
    assert image_problem([good]) == "record is a list, not an object"
    for key, value in (("id", True), ("id", "1"), ("file_name", 3), ("height", 0), ("width", 0), ("height", -1),
                       ("width", 10.0), ("height", None)):
        assert image_problem({**good, key: value}) == "needs int id, str file_name, positive int height/width"


def test_image_size_limits_met_exactly():
    def problem(height, width):
        return image_problem({"id": 1, "file_name": "a.jpg", "height": height, "width": width})

    assert problem(2**20, 2**8) is None and problem(2**8, 2**20) is None  # 2**20 a side
    assert problem(2**20 + 1, 1) == f"1x{2**20 + 1} is beyond 2**20 pixels a side or 2**29 in all"
    assert problem(1, 2**20 + 1) == f"{2**20 + 1}x1 is beyond 2**20 pixels a side or 2**29 in all"
    assert problem(2**20, 2**9 - 1) is None  # just under 2**29 pixels
    assert problem(2**20, 2**9) == f"{2**9}x{2**20} is beyond 2**20 pixels a side or 2**29 in all"
