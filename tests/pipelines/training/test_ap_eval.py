"""The quick COCO evaluation at each validation (pipelines/training/hooks/ap_eval.py): its subset, its numbers
against pycocotools' own, and the hook putting segm_AP into the epoch's report."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mrcnn.config import shapes
from mrcnn.model import build_model
from pipelines.data.loader import ShardBatchDecoder, decoder_for
from pipelines.data.shardset import ShardSet
from pipelines.training.hooks.ap_eval import ApEvalHook, ap_subset, detect, subset_ap, subset_of_split
from pipelines.training.hooks.checkpointing import CheckpointHook
from pipelines.training.hooks.validation import ValidationHook
from pipelines.training.optim import build_optimizer, build_scheduler
from pipelines.training.step import StepRunner
from pipelines.training.trainer import Trainer


def _val_annotations(synth_dataset) -> str:
    return str(synth_dataset / "annotations" / "instances_val2017.json")


def test_the_subset_is_the_first_images_by_id_among_the_shards_rows(synth_dataset):
    """Ids 500001..500006 in the ground truth; the shards lack 500001 and hold an id the ground truth lacks: the
    first three by id of those in both, with their annotations alone and every category."""
    gt = json.loads(open(_val_annotations(synth_dataset)).read())
    shard_ids = [500006, 500004, 500003, 500002, 500005, 999]
    subset = ap_subset(gt, shard_ids, count=3, coco_ids=[1, 3, 7])
    assert subset.image_ids == {500002, 500003, 500004}
    assert sorted(im["id"] for im in subset.ground_truth["images"]) == [500002, 500003, 500004]
    assert sorted(a["id"] for a in subset.ground_truth["annotations"]) == sorted(
        a["id"] for a in gt["annotations"] if a["image_id"] in (500002, 500003, 500004))
    assert subset.ground_truth["categories"] == gt["categories"] and subset.coco_ids == (1, 3, 7)
    assert ap_subset(gt, shard_ids, count=100, coco_ids=[1]).image_ids == set(shard_ids) - {999}


def _imperfect_detections(coco) -> list[dict]:
    """Every object of every image found, its mask shifted 0-2 px right (by annotation id) and its box grown,
    scores falling with the annotation id, and one confident false positive an image: an AP between 0 and 1."""
    import pycocotools.mask as mask_util

    def rle(mask: np.ndarray) -> dict:
        encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {**encoded, "counts": encoded["counts"].decode("ascii")}

    results = []
    for ann in coco.loadAnns(coco.getAnnIds(iscrowd=False)):
        x, y, w, h = ann["bbox"]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [x, y, w + ann["id"] % 4, h + 1], "score": 1.0 - (ann["id"] % 1000) / 100,
                        "segmentation": rle(np.roll(coco.annToMask(ann), ann["id"] % 3, axis=1))})
    for image in coco.loadImgs(coco.getImgIds()):
        corner = np.zeros((image["height"], image["width"]), np.uint8)
        corner[:10, :10] = 1
        results.append({"image_id": image["id"], "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.995,
                        "segmentation": rle(corner)})
    return results


def _pycocotools_ap(coco, results: list[dict], image_ids, iou_type: str) -> float:
    """COCOeval's AP alone on the whole ground truth told `image_ids`: segm without the boxes, bbox without the
    masks, as coco_metrics does."""
    from pycocotools.cocoeval import COCOeval

    drop = "bbox" if iou_type == "segm" else "segmentation"
    evaluator = COCOeval(coco, coco.loadRes([{k: v for k, v in r.items() if k != drop} for r in results]), iou_type)
    evaluator.params.imgIds = sorted(image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return float(evaluator.stats[0])


def test_the_quick_ap_is_pycocotools_own_on_the_subset(synth_dataset):
    """Known detections on all six images; the quick evaluation sees the four-image subset (its detections, its
    cut ground truth) and gives what pycocotools' COCOeval gives on the whole file told those four images (segm
    without the boxes, bbox without the masks, as coco_metrics does)."""
    from pycocotools.coco import COCO

    path = _val_annotations(synth_dataset)
    coco = COCO(path)
    subset = ap_subset(json.loads(open(path).read()), coco.getImgIds(), count=4, coco_ids=coco.getCatIds())
    results = _imperfect_detections(coco)
    ours = subset_ap([r for r in results if r["image_id"] in subset.image_ids], subset)
    for iou_type, key in (("segm", "segm_AP"), ("bbox", "bbox_AP")):
        assert ours[key] == pytest.approx(_pycocotools_ap(coco, results, subset.image_ids, iou_type), abs=1e-12)
    assert 0.0 < ours["segm_AP"] < 1.0 and 0.0 < ours["bbox_AP"] < 1.0, ours


def _batches(synth_shards: str, split: str, ids: set[int] | None = None) -> list[dict[str, torch.Tensor]]:
    """The split's rows as the loader decodes them, in batches of 2 (those of `ids` only when given)."""
    table = pq.read_table(f"{synth_shards}/{split}")
    if ids is not None:
        table = table.filter(np.isin(table.column("image_id").to_numpy(), sorted(ids)))
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    config = shapes()
    decoded = ShardBatchDecoder(**decoder_for(config, int(build_model(config, num_classes=4).anchors.shape[0])))(rows)
    n = len(decoded["image_ids"])
    return [{k: torch.as_tensor(v[i : i + 2]) for k, v in decoded.items()} for i in range(0, n, 2)]


def test_the_hook_puts_segm_ap_into_the_epochs_report(synth_shards, one_thread, tmp_path):
    """Two steps of one epoch, a checkpoint report after each: the first (before any evaluation) carries
    segm_AP -1, the epoch's end the quick evaluation's numbers with the validation loss, equal to pycocotools'
    own on the model's detections; the model is left in training mode with its own detection threshold."""
    from pycocotools.coco import COCO

    config = shapes()
    subset = subset_of_split(ShardSet.open(synth_shards), "val2017", count=4)
    train, ap_rows = _batches(synth_shards, "train2017")[:1], _batches(synth_shards, "val2017", set(subset.image_ids))
    assert sum(len(b["image_ids"]) for b in ap_rows) == 4
    torch.manual_seed(0)
    model = build_model(config, num_classes=4)
    threshold = model.detection_settings.min_confidence
    optimizer = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    runner = StepRunner(model=model, optimizer=optimizer, device=torch.device("cpu"), grad_clip=5.0, flip=False,
                        scheduler=build_scheduler(optimizer, total_steps=2, warmup_steps=0, schedule="cosine"))
    reports = []
    hooks = [ValidationHook(lambda: iter(ap_rows), device=torch.device("cpu"), every=1),
             ApEvalHook(lambda: iter(ap_rows), subset, device=torch.device("cpu"), every=1, min_confidence=0.0),
             CheckpointHook(1, {}, rank=0, world=1, report=lambda metrics, _: reports.append(metrics))]
    trainer = Trainer(runner, lambda epoch, skip: train * 2, last_step=2, batch_size=2, hooks=hooks)
    trainer.train()

    assert [r["step"] for r in reports] == [1, 2]
    assert reports[0]["segm_AP"] == reports[0]["bbox_AP"] == -1.0 and reports[0]["val_loss"] == float("inf")
    assert np.isfinite(reports[1]["val_loss"])
    results = detect(model, ap_rows, torch.device("cpu"), coco_ids=subset.coco_ids, min_confidence=0.0)
    assert results and {r["image_id"] for r in results} <= subset.image_ids
    assert model.training and model.detection_settings.min_confidence == threshold  # left as it was
    coco = COCO(str(ShardSet.open(synth_shards).splits["val2017"]["annotations"]))
    assert reports[1]["segm_AP"] == pytest.approx(_pycocotools_ap(coco, results, subset.image_ids, "segm"), abs=1e-12)
