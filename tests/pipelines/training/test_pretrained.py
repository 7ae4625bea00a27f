"""`torchvision:FILE` in the pipeline: COCO's categories from torchvision's meta, the 91-to-contiguous class mapping,
and the loop's initialisation and steps from such a file (without Ray)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from mrcnn.config import torchvision_maskrcnn
from mrcnn.model import build_model
from mrcnn.torchvision_weights import coco_category_names
from pipelines.data.categories import CategoryMap
from pipelines.training.pretrained import class_rows, coco_categories, load_torchvision_file
from tests.support.torchvision_reference import sample_images, torchvision_reference

torch.set_num_threads(1)  # shared 2-core machine: one thread avoids OpenMP contention

SIZE = 256
SMALL = torchvision_maskrcnn().override([f"image.min_dim={SIZE}", f"image.max_dim={SIZE}"])


def test_coco_categories_are_torchvisions_80():
    categories = coco_categories()
    assert categories.num_classes == 81 and len(categories.coco_ids) == 80
    assert categories.coco_ids[:12] == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13)  # 12 is one of the unused ids
    assert categories.to_coco(80) == 90 and categories.name(80) == "toothbrush" and categories.name(1) == "person"


def test_class_rows_only_for_coco_categories():
    coco = coco_categories()
    assert class_rows(coco) == [0, *coco.coco_ids]
    subset = CategoryMap((1, 18, 90), ("person", "Dog", "toothbrush"))  # names compared without case
    assert class_rows(subset) == [0, 1, 18, 90]
    assert class_rows(CategoryMap((1, 3, 7), ("circle", "square", "triangle"))) is None  # the synthetic shapes
    assert class_rows(CategoryMap((12,), ("street sign",))) is None  # an id COCO leaves unused
    assert class_rows(CategoryMap((1, 91), ("person", "hat"))) is None  # beyond torchvision's 91 rows


@pytest.fixture(scope="module")
def coco90_file(tmp_path_factory):
    """torchvision's model (the equivalence test's reference) made to see COCO id 90 (toothbrush) often, its 10 unused
    rows never (as in the COCO weights, where they were never a target), saved as its state dict."""
    reference = torchvision_reference()
    unused = [i for i, name in enumerate(coco_category_names()) if name == "N/A"]
    with torch.no_grad():
        cls = reference.roi_heads.box_predictor.cls_score
        cls.weight[unused] = 0.0
        cls.bias[unused] = -20.0
        cls.bias[90] += 1.0
    path = tmp_path_factory.mktemp("torchvision") / "maskrcnn.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_a_detection_of_coco_id_90_by_torchvision_comes_out_as_coco_id_90(coco90_file):
    """Through the shards' category map (COCO's 80: contiguous 80 is COCO 90): our detections are torchvision's, with
    our class ids mapped back, down to the category_id of the COCO results evaluate writes."""
    from pipelines.evaluation.evaluate import to_coco_results

    reference, path = coco90_file
    categories = coco_categories()
    torch.manual_seed(0)
    model = build_model(SMALL, num_classes=categories.num_classes)
    report = load_torchvision_file(model, f"torchvision:{path}", categories)
    assert not report.reinitialised and len(report.loaded) == 307
    images, windows = sample_images(SIZE, [(0, 0, SIZE, SIZE)]), torch.tensor([[0, 0, SIZE, SIZE]])
    model.eval()
    with torch.no_grad():
        x = model.normalize(images)
        features = reference.backbone(x)
        proposals, _ = reference.rpn(ImageList(x, [(SIZE, SIZE)]), features)
        theirs = reference.roi_heads(features, proposals, [(SIZE, SIZE)])[0][0]
        ours = model({"images": images, "windows": windows})[0]
    labels = theirs["labels"]
    assert (labels == 90).sum() >= 10 and len(torch.unique(labels)) >= 2
    assert 90 not in ours["class_ids"].tolist()  # our ids are contiguous: 80 is COCO's 90
    assert [categories.to_coco(int(c)) for c in ours["class_ids"]] == labels.tolist()
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-5, atol=1e-4)
    # the softmax over 81 classes, not 91: the unused rows' share (exp(-20) each) is all that differs
    torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["masks"], theirs["masks"][:, 0], rtol=1e-5, atol=1e-5)
    results = to_coco_results(ours, image_id=7, scale=1.0, window=[0, 0, SIZE, SIZE], height=SIZE, width=SIZE,
                              coco_ids=list(categories.coco_ids))
    assert [r["category_id"] for r in results] == labels.tolist()
