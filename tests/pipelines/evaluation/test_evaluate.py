"""Evaluation: the way back to original pixels is exact, and the stage runs end to end on real shards."""

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from mrcnn.config import coco, shapes
from mrcnn.geometry import boxes_to_original
from mrcnn.mini_masks import mini_mask_boxes
from mrcnn.model import build_model
from pipelines.data.categories import CategoryMap
from pipelines.data.coco import read_split, split_paths
from pipelines.data.coco_metrics import evaluate_detections
from pipelines.data.coco_results import to_coco_results
from pipelines.data.rows import RowMaker
from pipelines.data.shards import decode_row
from pipelines.evaluation.evaluate import EvaluateRequest, evaluate
from pipelines.infra.context import RunContext
from pipelines.models import ModelMismatchError
from pipelines.training.checkpoints import save_checkpoint


def _perfect_results(config, annotations: str, images: str) -> tuple[list[dict], list[int]]:
    """Ground truth through preprocess (one RowMaker per record, in-process) and back out through the
    evaluation's mapping to original pixels, as a perfect model's output with score 1.0."""
    source = read_split(annotations, images)
    coco_ids = list(source.categories.coco_ids)
    maker = RowMaker(config.to_dict())
    results, image_ids = [], []
    for record in source.records:
        row, _ = maker.make(record)
        if row is None:
            continue
        r = decode_row(row)
        image_ids.append(r["image_id"])
        if not len(r["gt_class_ids"]):
            continue
        gt_boxes = torch.as_tensor(r["gt_boxes"])
        # masks are relative to the mini-mask box (the integer box enclosing the gt box)
        det = {
            "boxes": mini_mask_boxes(gt_boxes),
            "class_ids": torch.as_tensor(r["gt_class_ids"]),
            "scores": torch.ones(len(gt_boxes)),
            "masks": torch.as_tensor(r["mini_masks"]).float(),
        }
        out = to_coco_results(det, image_id=r["image_id"], scale=r["scale"], window=r["window"].tolist(),
                              height=r["height"], width=r["width"], coco_ids=coco_ids)
        boxes = boxes_to_original(gt_boxes, scale=r["scale"], window=tuple(r["window"].tolist()))
        for d, (x1, y1, x2, y2) in zip(out, boxes.tolist(), strict=True):
            d["bbox"] = [x1, y1, x2 - x1, y2 - y1]  # the gt box itself, mapped back
        results.extend(out)
    return results, image_ids


def test_way_back_is_exact_on_synthetic_data_at_shapes(synth_dataset, capsys):
    annotations, images = split_paths(str(synth_dataset), "val2017")
    results, image_ids = _perfect_results(shapes(), annotations, images)
    metrics = evaluate_detections(annotations, results, image_ids=image_ids).metrics
    with capsys.disabled():
        print(f"\n[way back, synthetic val, shapes] bbox AP {metrics['bbox/AP']:.3f} segm AP {metrics['segm/AP']:.3f}")
    assert metrics["bbox/AP"] >= 0.99
    assert metrics["segm/AP"] >= 0.9


@pytest.mark.slow
def test_way_back_is_exact_on_coco128_at_coco(shared_data, capsys):
    root = shared_data / "coco128"
    annotations, images = split_paths(str(root), "train2017")
    results, image_ids = _perfect_results(coco(), annotations, images)
    metrics = evaluate_detections(annotations, results, image_ids=image_ids).metrics
    with capsys.disabled():
        print(f"\n[way back, coco128, coco] bbox AP {metrics['bbox/AP']:.3f} segm AP {metrics['segm/AP']:.3f}")
    assert metrics["bbox/AP"] >= 0.9995  # 1.000: the stored geometry maps the gt boxes back exactly
    assert metrics["segm/AP"] >= 0.985  # 0.990: 56x56 mini-masks lose a little


def _checkpoint(tmp_path: Path, config, categories: dict, name: str = "ckpt") -> str:
    torch.manual_seed(0)
    model = build_model(config, num_classes=CategoryMap.from_dict(categories).num_classes)
    meta = {"config": config.to_dict(), "categories": categories, "fingerprint": config.fingerprint(),
            "num_classes": CategoryMap.from_dict(categories).num_classes}
    return str(save_checkpoint(tmp_path / name, model=model, optimizer=None, scheduler=None, step=0, epoch=0,
                               batch_in_epoch=0, meta=meta))


@pytest.mark.slow
def test_evaluate_stage_end_to_end(synth_shards, trained_shapes, tmp_path):
    """The briefly trained shapes model (tests/pipelines/evaluation/conftest.py) on the whole validation split: the
    stage's metrics are pycocotools' own on the stage's detections.json, named as COCOeval's summary orders them."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from pipelines.data.shardset import read_manifest

    manifest = read_manifest(synth_shards)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = evaluate(EvaluateRequest(shards=synth_shards, model_path=trained_shapes, split="val2017",
                                      out=str(tmp_path / "ev")), RunContext(tracking_uri=uri, use_gpu=False))
    out = Path(result.out)
    metrics = json.loads((out / "metrics.json").read_text())
    gt = COCO(manifest["splits"]["val2017"]["annotations"])
    detections = json.loads((out / "detections.json").read_text())
    assert detections, "the trained model finds something"
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    for iou_type in ("bbox", "segm"):
        reference = COCOeval(gt, gt.loadRes(detections), iou_type)
        reference.params.imgIds = sorted(gt.getImgIds())
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
        assert [metrics[f"{iou_type}/{n}"] for n in names] == pytest.approx(list(reference.stats), abs=1e-9)
    assert metrics["bbox/AP50"] > 0  # not a run of -1 (no ground truth) or 0 (nothing found)
    assert any(k.startswith("segm/AP/") for k in metrics)  # per-category AP
    detections = json.loads((out / "detections.json").read_text())
    assert {d["image_id"] for d in detections} <= set(gt.getImgIds())
    assert all(isinstance(d["segmentation"]["counts"], str) and d["category_id"] in (1, 3, 7) for d in detections)
    assert (out / "pr_curve_bbox.png").stat().st_size > 0 and (out / "pr_curve_segm.png").stat().st_size > 0
    # the prediction pictures were never drawn (a KeyError swallowed by a catch-all): they are there now
    assert Image.open(out / "predictions.png").size[0] > 0
    assert "Average Precision" in result.table
    run = MlflowClient(uri).get_run(result.run_id)
    assert "segm_AP" in run.data.metrics and run.data.tags["stage"] == "evaluate"
    assert {a.path for a in MlflowClient(uri).list_artifacts(result.run_id)} == {"evaluation"}
    logged = {a.path for a in MlflowClient(uri).list_artifacts(result.run_id, "evaluation")}
    assert "evaluation/predictions.png" in logged


def test_model_of_another_geometry_or_categories_is_refused(synth_shards, tmp_path):
    from pipelines.data.shardset import read_manifest

    manifest = read_manifest(synth_shards)
    other = shapes().override(["image.max_dim=256", "image.min_dim=256"])
    with pytest.raises(ModelMismatchError, match=r"image\.max_dim: 128 != 256"):
        evaluate(EvaluateRequest(shards=synth_shards, model_path=_checkpoint(tmp_path, other, manifest["categories"])),
                 RunContext())
    fewer = CategoryMap(coco_ids=(1, 3), names=("circle", "square")).to_dict()
    with pytest.raises(ModelMismatchError, match="categories"):
        evaluate(EvaluateRequest(shards=synth_shards, model_path=_checkpoint(tmp_path, shapes(), fewer, "c2")),
                 RunContext())


def test_a_cpu_model_actor_fits_on_a_node():
    """4 CPUs as two 2-CPU nodes: one actor of 3 CPUs was never placed and evaluate waited forever."""
    from pipelines.evaluation.evaluate import model_actor_cpus

    assert model_actor_cpus(4, 1, largest_node=2) == 1  # the multi-node test cluster
    assert model_actor_cpus(4, 1, largest_node=4) == 3  # one node: all but one CPU
    assert model_actor_cpus(4, 2, largest_node=4) == 1
    assert model_actor_cpus(16, 2, largest_node=16) == 7
    assert model_actor_cpus(1, 1, largest_node=1) == 1
