"""`torchvision:FILE` in the pipeline: COCO's categories from torchvision's meta, the 91-to-contiguous class mapping,
and the loop's initialisation and steps from such a file (without Ray)."""

from __future__ import annotations

from dataclasses import replace

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
    from pipelines.data.coco_results import to_coco_results

    reference, path = coco90_file
    categories = coco_categories()
    torch.manual_seed(0)
    model = build_model(SMALL, num_classes=categories.num_classes)
    report = load_torchvision_file(model, str(path), categories)
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


SHAPES = CategoryMap((1, 3, 7), ("circle", "square", "triangle"))  # not COCO's: the class layers start fresh


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """`maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`, seeded, saved as its state dict (BatchNorm2d:
    with the 53 num_batches_tracked counters our frozen backbone has no place for)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    state = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    path = tmp_path_factory.mktemp("torchvision") / "maskrcnn.pth"
    torch.save(state, path)
    return path


def _training_batch(config, anchors) -> dict[str, torch.Tensor]:
    """The loader's Batch dict for one image with two boxes (classes 1 and 3), built with the contract's helpers."""
    from mrcnn.mini_masks import mini_mask_boxes, minimize_masks
    from mrcnn.rpn_targets import compute_rpn_targets, dense_rpn_targets

    g, m, rpn = config.roi.max_gt_instances, config.mask.mini_mask_size, config.rpn
    boxes = torch.tensor([[40.0, 30.0, 120.0, 110.0], [150.0, 140.0, 230.0, 200.0]])
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[k, y1:y2, x1:x2] = True
    batch = {
        "images": sample_images(SIZE, [(0, 0, SIZE, SIZE)]), "windows": torch.tensor([[0, 0, SIZE, SIZE]]),
        "gt_class_ids": torch.zeros(1, g, dtype=torch.int64), "gt_boxes": torch.zeros(1, g, 4),
        "gt_mini_masks": torch.zeros(1, g, m, m, dtype=torch.uint8), "crowd_boxes": torch.zeros(1, 1, 4),
    }
    batch["gt_class_ids"][0, :2] = torch.tensor([1, 3])
    batch["gt_boxes"][0, :2] = boxes
    batch["gt_mini_masks"][0, :2] = minimize_masks(masks, mini_mask_boxes(boxes), size=m).to(torch.uint8)
    targets = compute_rpn_targets(anchors=anchors, gt_boxes=boxes, crowd_boxes=torch.zeros(0, 4),
                                  positive_iou=rpn.positive_iou, negative_iou=rpn.negative_iou, crowd_iou=0.001,
                                  bbox_std=rpn.bbox_std)
    match, deltas = dense_rpn_targets(anchors.shape[0], *targets)
    return {**batch, "rpn_match": match.unsqueeze(0), "rpn_deltas": deltas.unsqueeze(0)}


def _steps(model, config, layers: str, steps: int = 1) -> None:
    from pipelines.training.optim import build_optimizer, build_scheduler, set_trainable_layers
    from pipelines.training.step import StepRunner

    set_trainable_layers(model, layers)
    optimizer = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    scheduler = build_scheduler(optimizer, total_steps=steps, warmup_steps=0, schedule="step", decay_at=(0.9,))
    runner = StepRunner(model=model, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"),
                        grad_clip=5.0, flip=False)
    batch = _training_batch(config, model.anchors)
    for step in range(steps):
        result = runner(batch, step)
        assert result.finite and result.total > 0, result.losses


def _stage(name: str) -> str:
    """The ResNet stage of one of our tensor names ('layer3', 'stem'), or 'heads' outside the ResNet."""
    parts = name.split(".")
    if parts[0] != "backbone":
        return "heads"
    return parts[1] if parts[1].startswith("layer") else "stem"


def test_stagewise_fine_tuning_from_torchvision_weights_at_another_class_count(torchvision_file, tmp_path):
    """matterport's way from torchvision's weights, through the loop's `initialise` and `StepRunner`: `--init
    torchvision:FILE` into a 4-class model (the class layers alone fresh, every other tensor the file's, and the loop
    says how many were loaded, re-initialised and skipped), train `heads`, then `4+` from that checkpoint, then `all`:
    each stage changes exactly the layers it trains."""
    from mrcnn.torchvision_weights import CLASS_SPECIFIC, convert_state
    from pipelines.training.checkpoints import save_checkpoint
    from pipelines.training.loop import initialise
    from pipelines.training.plan import WorkerPlan

    config = SMALL.override(["rpn.post_nms_train=200", "roi.rois_per_image=64"])  # smaller steps, same conventions
    loop = WorkerPlan(config=config, categories=SHAPES.to_dict(), fingerprint="f", num_classes=4, total_steps=1,
                      steps_per_epoch=1, global_batch=1, model_path=f"torchvision:{torchvision_file}")
    torch.manual_seed(1)
    model = build_model(config, num_classes=4)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    messages = initialise(model, loop)
    assert messages[0].startswith(f"initialised from torchvision:{torchvision_file} (torchvision's Mask R-CNN): 301 "
                                  "tensors loaded, 6 re-initialised (class-specific: box_head.class_logits.weight")
    assert "53 skipped (unused: backbone.bn1.num_batches_tracked" in messages[0]
    assert "not COCO's" in messages[1] and len(messages) == 2  # the preset's conventions: no difference to report
    _, file_tensors, _ = convert_state(torch.load(torchvision_file, weights_only=True), class_rows=None)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh[key] if key in CLASS_SPECIFIC else file_tensors[key]), key

    trained = {"heads": {"heads"}, "4+": {"heads", "layer3", "layer4"},
               "all": {"heads", "stem", "layer1", "layer2", "layer3", "layer4"}}
    for stage, layers in trained.items():
        if stage != "heads":  # the next stage starts from the last one's checkpoint (`--init CKPT --layers 4+`)
            save_checkpoint(tmp_path / stage, model=model, optimizer=None, scheduler=None, step=1, epoch=0,
                            batch_in_epoch=0, meta={})
            torch.manual_seed(2)
            model = build_model(config, num_classes=4)
            initialise(model, replace(loop, model_path=str(tmp_path / stage)))
        before = {k: v.clone() for k, v in model.named_parameters()}
        _steps(model, config, stage)
        changed = {_stage(k) for k, v in model.named_parameters() if not torch.equal(v, before[k])}
        assert changed == layers, stage


def test_a_torchvision_file_as_a_model_for_evaluate_predict_and_inspect(torchvision_file, tmp_path, monkeypatch):
    """`--model-path torchvision:FILE`: the torchvision preset's config, the shards' categories (COCO's 80 without
    shards), every tensor loaded; categories that are not COCO's, shards of another geometry and a file without
    detection heads are refused, each naming why."""
    import torchvision

    from mrcnn.config import coco
    from mrcnn.torchvision_weights import convert_state
    from pipelines.models import ModelMismatchError, check_model_fits, load_model, model_spec

    spec = model_spec(f"torchvision:{torchvision_file}")
    assert spec.config == torchvision_maskrcnn() and spec.num_classes == 81 and spec.location.endswith("maskrcnn.pth")
    assert CategoryMap.from_dict(spec.categories) == coco_categories()
    model = load_model(spec)
    assert not model.training
    state = torch.load(torchvision_file, weights_only=True)
    _, expected, _ = convert_state(state, class_rows=class_rows(coco_categories()))
    ours = model.state_dict()
    assert len(ours) == 307 and all(torch.equal(ours[k], v) for k, v in expected.items() if "num_batches" not in k)
    monkeypatch.chdir(torchvision_file.parent)  # a relative path is made absolute: Ray actors load it elsewhere
    assert model_spec("torchvision:maskrcnn.pth").location == f"torchvision:{torchvision_file}"
    subset = CategoryMap((1, 90), ("person", "toothbrush"))
    manifest = {"categories": subset.to_dict(), "shard_fields": torchvision_maskrcnn().shard_fields()}
    spec = model_spec(f"torchvision:{torchvision_file}", categories=manifest["categories"])
    check_model_fits(spec, manifest)
    assert spec.num_classes == 3
    with pytest.raises(ModelMismatchError, match=r"rpn\.anchor_offset: 0\.5 != 0\.0"):
        check_model_fits(spec, {**manifest, "shard_fields": coco().shard_fields()})
    with pytest.raises(ModelMismatchError, match="predicts COCO's categories, and these are not COCO's.*'circle'"):
        model_spec(f"torchvision:{torchvision_file}", categories=SHAPES.to_dict())
    resnet = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), resnet)
    with pytest.raises(ModelMismatchError, match="an ImageNet ResNet has no detection heads"):
        load_model(model_spec(f"torchvision:{resnet}"))


def test_a_config_off_torchvisions_conventions_still_loads_and_is_told_so(torchvision_file):
    """The weights fit any ResNet-50-FPN config with 256-channel heads (e.g. `coco`), as a starting point only: the
    loop says which of the preset's conventions differ."""
    from mrcnn.config import coco
    from pipelines.training.loop import initialise
    from pipelines.training.plan import WorkerPlan

    config = coco()
    model = build_model(config, num_classes=coco_categories().num_classes)
    loop = WorkerPlan(config=config, categories=coco_categories().to_dict(), fingerprint="f", num_classes=81,
                      total_steps=1, steps_per_epoch=1, global_batch=1, model_path=f"torchvision:{torchvision_file}")
    messages = initialise(model, loop)
    assert "307 tensors loaded, 0 re-initialised" in messages[0]  # the class layers too: COCO's categories
    assert messages[1].startswith("classes: the shards' 80 COCO categories take torchvision's class rows")
    assert "differs from the torchvision preset" in messages[2]
    assert "rpn.anchor_offset: 0.5 (0.0)" in messages[2] and "roi.aligned: True (False)" in messages[2]
