import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from mrcnn.mini_masks import (
    expand_masks,
    mask_targets,
    mini_mask_boxes,
    minimize_masks,
    pack_masks,
    paste_masks,
    unpack_masks,
)


def _disc(height, width, cx, cy, r):
    """bool [height, width]: pixels whose centre lies within r of (cx, cy)."""
    y = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    x = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    return (x - cx) ** 2 + (y - cy) ** 2 <= r**2


def _iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


def test_mini_mask_boxes_by_hand():
    boxes = torch.tensor([[1.2, 3.7, 5.0, 9.1], [2.3, 4.0, 2.3, 4.0], [0.0, 0.0, 0.5, 0.5]])
    expected = torch.tensor([[1.0, 3.0, 5.0, 10.0], [2.0, 4.0, 3.0, 5.0], [0.0, 0.0, 1.0, 1.0]])
    out = mini_mask_boxes(boxes)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    # a zero-size box on whole pixels still gets one pixel; integers (a tensor or a list) come back as float32
    whole = mini_mask_boxes(torch.tensor([[2, 4, 2, 4], [1, 1, 3, 6]]))
    assert whole.dtype == torch.float32 and whole.tolist() == [[2.0, 4.0, 3.0, 5.0], [1.0, 1.0, 3.0, 6.0]]
    assert mini_mask_boxes([[2, 4, 2, 4]]).tolist() == [[2.0, 4.0, 3.0, 5.0]]
    assert mini_mask_boxes(boxes.double()).dtype == torch.float64


def test_minimize_exact_downsample_by_hand():
    # an 8 x 8 mask whose box is its left 4 columns and all 8 rows, sampled to 2 x 2: 2 x 4 pixels per bin
    mask = torch.zeros(1, 8, 8, dtype=torch.uint8)
    mask[0, :4, :2] = 1  # top-left bin full
    mask[0, 4:, 0] = 1  # bottom-left bin half full (0.5 -> kept)
    mask[0, :4, 3] = 1  # top-right bin 4 of 8 pixels: half -> kept
    mask[0, 4, 2] = 1  # bottom-right bin 1 of 8 -> dropped
    out = minimize_masks(mask, torch.tensor([[0.0, 0.0, 4.0, 8.0]]), size=2)
    assert out.dtype == torch.bool
    assert out[0].tolist() == [[True, True], [True, False]]


def test_expand_by_hand():
    mini = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.bool)
    out = expand_masks(mini, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), 4, 4)
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, :2, :2] = True
    assert torch.equal(out, expected)
    # a full mini-mask fills exactly its (integer) box and nothing else
    full = expand_masks(torch.ones(1, 56, 56, dtype=torch.bool), torch.tensor([[2.0, 3.0, 6.0, 5.0]]), 8, 8)
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[0, 3:5, 2:6] = True
    assert torch.equal(full, expected)


def test_paste_masks_equals_grid_sample():
    # independent implementation: grid_sample bilinear, align_corners=False, zeros padding, over the whole image
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 28, 28, generator=g)
    boxes = torch.tensor([[3.3, 5.1, 40.7, 30.2], [-4.0, 10.0, 20.0, 50.5], [0.0, 0.0, 64.0, 48.0]])
    height, width = 48, 64
    out = paste_masks(masks, boxes, height, width)
    x = torch.arange(width) + 0.5
    y = torch.arange(height) + 0.5
    gx = 2 * (x[None, :] - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]) - 1  # [N, W]
    gy = 2 * (y[None, :] - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) - 1  # [N, H]
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # [N, H, W, 2]
    ref = F.grid_sample(masks[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(paste_masks(masks, boxes.double(), height, width), out)  # float64 boxes: the same


def test_paste_masks_into_a_box_narrower_than_a_pixel():
    """A box 0.5 px wide (a detection can be): the mask spans it at 4 cells a pixel, so pixel 2's centre (2.5)
    falls half way between the two cells of a 2-cell mask and reads their mean; the pixels beside it read nothing."""
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    out = paste_masks(mask, torch.tensor([[2.25, 0.0, 2.75, 2.0]]), 2, 5)
    assert out[0].tolist() == [[0.0, 0.0, 0.5, 0.0, 0.0]] * 2


def test_paste_masks_in_chunks_pastes_every_mask():
    """40 masks (chunks of 16: 16, 16, 8) pasted at once equal each pasted alone."""
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(40, 6, 6, generator=g)
    boxes = torch.rand(40, 2, generator=g) * 20
    boxes = torch.cat([boxes, boxes + 4 + torch.rand(40, 2, generator=g) * 10], dim=1)
    together = paste_masks(masks, boxes, 30, 36)
    alone = torch.cat([paste_masks(masks[i : i + 1], boxes[i : i + 1], 30, 36) for i in range(40)])
    assert torch.equal(together, alone) and bool((together[-8:].amax(dim=(1, 2)) > 0).all())


@pytest.mark.parametrize("size", [28, 56])
def test_round_trip_on_a_disc(size):
    disc = _disc(200, 160, cx=90.0, cy=70.0, r=40.0)
    gt = torch.tensor([[50.0, 30.0, 130.0, 110.0]])
    boxes = mini_mask_boxes(gt)
    mini = minimize_masks(disc[None], boxes, size=size)
    back = expand_masks(mini, boxes, 200, 160)
    assert _iou(back[0], disc) >= 0.9
    # at 56 the loss is a thin rim only
    if size == 56:
        assert _iou(back[0], disc) >= 0.97


def test_round_trip_from_original_resolution_mask():
    # the shard recipe: the mini box in padded pixels, divided by the scale, samples the ORIGINAL mask
    scale = 2.5
    original = _disc(80, 100, cx=41.3, cy=37.9, r=17.2)
    padded_disc = _disc(200, 250, cx=41.3 * scale, cy=37.9 * scale, r=17.2 * scale)
    gt = torch.tensor([[41.3 - 17.2, 37.9 - 17.2, 41.3 + 17.2, 37.9 + 17.2]]) * scale
    boxes = mini_mask_boxes(gt)
    mini = minimize_masks(original[None].to(torch.uint8), boxes / scale, size=56)
    back = expand_masks(mini, boxes, 200, 250)
    assert _iou(back[0], padded_disc) >= 0.95


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(0)
    mini = rng.random((3, 5, 5)) > 0.5  # 75 bits: not a whole number of bytes
    data = pack_masks(mini)
    assert isinstance(data, bytes) and len(data) == 10
    assert data[0] == int("".join("1" if b else "0" for b in mini.reshape(-1)[:8]), 2)  # C order, MSB first
    assert np.array_equal(unpack_masks(data, 3, 5), mini) and unpack_masks(data, 3, 5).dtype == bool
    big = rng.random((7, 56, 56)) > 0.5
    assert np.array_equal(unpack_masks(pack_masks(torch.from_numpy(big)), 7, 56), big)
    assert unpack_masks(pack_masks(np.zeros((0, 56, 56), bool)), 0, 56).shape == (0, 56, 56)
    # whatever the dtype, a mask packs as its truth value: float 0 / 1 targets, uint8 0 / 255, probabilities
    assert pack_masks(mini.astype(np.float32)) == pack_masks(torch.from_numpy(mini).float()) == data
    assert pack_masks(mini.astype(np.uint8) * 255) == pack_masks(np.where(mini, 0.7, 0.0)) == data


def test_expand_masks_keeps_a_pixel_pasted_exactly_at_one_half():
    """Mini-mask columns (1, 0) over a box from x = 0.5 to 2.5: pixel 1's centre (1.5) lies half way between the
    two cells' centres, so it pastes to exactly 0.5, and pixel 0's (0.5) half a cell outside the box: also 0.5."""
    mini = torch.tensor([[[1, 0], [1, 0]]], dtype=torch.uint8)
    box = torch.tensor([[0.5, 0.0, 2.5, 2.0]])
    pasted = paste_masks(mini, box, 2, 4)
    assert pasted[0].tolist() == [[0.5, 0.5, 0.0, 0.0]] * 2
    assert expand_masks(mini, box, 2, 4)[0].tolist() == [[True, True, False, False]] * 2


def test_mask_targets_by_hand():
    mini = torch.ones(1, 56, 56, dtype=torch.uint8)
    mini_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    rois = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    out = mask_targets(mini, mini_boxes, rois, torch.zeros(3, dtype=torch.int64), size=28)
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.ones(28, 28))
    # the RoI's left half lies inside the mini box, its right half outside
    torch.testing.assert_close(out[1, :, :13], torch.ones(28, 13))
    torch.testing.assert_close(out[1, :, 15:], torch.zeros(28, 13))
    torch.testing.assert_close(out[2], torch.zeros(28, 28))


def test_mask_targets_pick_the_gt_of_each_roi():
    mini = torch.zeros(2, 4, 4, dtype=torch.bool)
    mini[1] = True
    mini_boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]])
    rois = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    out = mask_targets(mini, mini_boxes, rois, torch.tensor([1, 0]), size=4)
    torch.testing.assert_close(out[0], torch.ones(4, 4))
    torch.testing.assert_close(out[1], torch.zeros(4, 4))
    none = mask_targets(mini, mini_boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), size=28)
    assert none.shape == (0, 28, 28) and none.dtype == torch.float32
    one = mask_targets(mini, mini_boxes, rois[:1], torch.tensor([1]), size=4)  # a single RoI is not "no RoI"
    torch.testing.assert_close(one, torch.ones(1, 4, 4))


def test_mask_targets_average_every_cell_a_bin_covers_and_accept_float64_boxes():
    """One 1 x 1 target over a 4 x 4 mini-mask whose columns are (1, 1, 1, 0): roi_align's adaptive sampling
    takes the bin's four cell centres in each direction, mean 0.75 (one sample at the bin's centre would give 1).
    float64 RoIs and mini boxes give the float32 answer (roi_align itself wants one dtype)."""
    mini = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool).expand(4, 4)[None]
    box = torch.tensor([[10.0, 20.0, 18.0, 28.0]])
    out = mask_targets(mini, box, box.clone(), torch.tensor([0]), size=1)
    assert out.tolist() == [[[0.75]]]
    wide = mask_targets(mini, box, box.clone(), torch.tensor([0]), size=2)  # two cells a bin: (1, 0.5) a row
    torch.testing.assert_close(wide, torch.tensor([[[1.0, 0.5], [1.0, 0.5]]]))
    as64 = mask_targets(mini, box.double(), box.double(), torch.tensor([0]), size=2)
    assert as64.dtype == torch.float32 and torch.equal(as64, wide)


def test_mask_targets_match_roi_align_on_the_full_mask():
    g = torch.Generator().manual_seed(0)
    discs = torch.stack([_disc(256, 256, 100.0, 120.0, 50.0), _disc(256, 256, 180.0, 60.0, 25.3)])
    gt = torch.tensor([[50.0, 70.0, 150.0, 170.0], [154.7, 34.7, 205.3, 85.3]])
    mini_boxes = mini_mask_boxes(gt)
    mini = minimize_masks(discs, mini_boxes, size=56)
    # jittered RoIs around each gt box, as the detection-target layer would produce
    gt_index = torch.tensor([0, 1] * 10)
    base = gt[gt_index]
    wh = (base[:, 2:] - base[:, :2]).repeat(1, 2)
    rois = base + (torch.rand(20, 4, generator=g) - 0.5) * 0.4 * wh
    ours = mask_targets(mini, mini_boxes, rois, gt_index, size=28)
    direct = roi_align(
        discs.float()[:, None],
        torch.cat([gt_index[:, None].float(), rois], dim=1),
        output_size=28,
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=True,
    )[:, 0]
    diff = (ours - direct).abs()
    assert diff.mean() < 0.02, f"mean abs diff {diff.mean():.4f}"
    # after the loss's own 0.5 threshold nearly every target pixel agrees
    assert ((ours >= 0.5) == (direct >= 0.5)).float().mean() > 0.98


def test_minimize_masks_reads_only_around_each_box_and_gives_what_roi_align_gives_on_the_whole_mask():
    """Each mask is cropped to its box (plus a pixel) before roi_align: the result must be roi_align's over the
    full mask (torchvision, the independent reference), boxes inside, across the edges and outside the mask."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(40, 37, 53, dtype=torch.uint8)
    for i in range(40):  # a random blob per mask: an ellipse with noise
        cy, cx = torch.randint(0, 37, (1,), generator=g).item(), torch.randint(0, 53, (1,), generator=g).item()
        yy, xx = torch.meshgrid(torch.arange(37), torch.arange(53), indexing="ij")
        blob = ((yy - cy) / 9.0) ** 2 + ((xx - cx) / 13.0) ** 2 < 1
        masks[i] = (blob ^ (torch.rand(37, 53, generator=g) < 0.05)).to(torch.uint8)
    lo = torch.rand(40, 2, generator=g) * torch.tensor([70.0, 50.0]) - torch.tensor([10.0, 8.0])
    boxes = torch.cat([lo, lo + 0.5 + torch.rand(40, 2, generator=g) * 30], 1)  # some beyond every edge
    boxes[:5] = boxes[:5].round()  # whole-pixel boxes too
    rois = torch.cat([torch.arange(40, dtype=torch.float32)[:, None], boxes], 1)
    expected = roi_align(masks.float()[:, None], rois, output_size=28, spatial_scale=1.0, sampling_ratio=-1,
                         aligned=True)[:, 0] >= 0.5
    got = minimize_masks(masks, boxes, size=28)
    assert got.shape == (40, 28, 28)
    # float rounding of the shifted box may flip a bin sitting exactly on the 0.5 threshold, nothing more
    assert (got != expected).sum() <= 2, (got != expected).sum()
    far = torch.tensor([[60.0, 40.0, 70.0, 50.0]])
    assert not minimize_masks(masks[:1], far, size=28).any()
