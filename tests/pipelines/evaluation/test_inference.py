"""The evaluation's three stages: decode, the model's packed outputs, the way back; and the Ray pipeline of them
gives the metrics of the one-loop path it replaced (decode with RPN targets, model, way back, all in turn)."""

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mrcnn.anchors import anchors_from_config
from mrcnn.config import shapes
from pipelines.data.categories import CategoryMap
from pipelines.data.coco_metrics import evaluate_detections
from pipelines.data.coco_results import coco_results_of_batch, pack_detections, to_coco_results, unpack_detections
from pipelines.data.loader import ShardBatchDecoder, decoder_for
from pipelines.data.shardset import read_manifest
from pipelines.evaluation.evaluate import EvaluateRequest, evaluate
from pipelines.evaluation.inference import decode_inputs
from pipelines.infra.context import RunContext
from pipelines.models import load_model, model_spec


def _rows(shards: str, split: str = "val2017") -> dict[str, np.ndarray]:
    table = pq.read_table(f"{shards}/{split}")
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _detections(counts: list[int], m: int = 28) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [{"boxes": torch.rand(k, 4, generator=gen) * 100, "scores": torch.rand(k, generator=gen),
             "class_ids": torch.randint(1, 5, (k,), generator=gen), "masks": torch.rand(k, m, m, generator=gen)}
            for k in counts]


def test_packed_outputs_unpack_to_what_the_model_gave():
    detections = _detections([3, 0, 5])
    packed = pack_detections(detections, max_detections=5)
    assert packed["det_count"].tolist() == [3, 0, 5]
    assert packed["det_masks"].shape == (3, 5, 28, 28) and packed["det_boxes"].shape == (3, 5, 4)
    for i, det in enumerate(detections):
        back = unpack_detections(packed, i)
        assert set(back) == set(det)
        for key in det:
            assert back[key].dtype == det[key].dtype and torch.equal(back[key], det[key]), key
    with pytest.raises(ValueError, match="more than max_detections 4"):
        pack_detections(detections, max_detections=4)


def test_an_empty_batch_packs_to_empty_arrays_of_the_packed_shapes():
    """A batch of no images (a dataset's last, filtered block can be empty): arrays with no rows, not an error."""
    packed = pack_detections([], max_detections=5)
    assert {key: (value.shape, value.dtype) for key, value in packed.items()} == {
        "det_count": ((0,), np.int64), "det_boxes": ((0, 5, 4), np.float32), "det_scores": ((0, 5), np.float32),
        "det_classes": ((0, 5), np.int64), "det_masks": ((0, 5, 1, 1), np.float32)}


def test_read_only_blocks_unpack_into_writable_tensors_without_a_warning():
    """Ray Data's blocks arrive as read-only arrays: torch over one warns (and may not be written)."""
    import warnings

    packed = pack_detections(_detections([2]), max_detections=3)
    for array in packed.values():
        array.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = unpack_detections(packed, 0)
    back["masks"][0, 0, 0] = 1.0  # its own memory: the block is untouched (torch.rand is < 1)
    assert packed["det_masks"][0, 0, 0, 0] < 1.0


def test_decode_gives_the_training_decoders_images_without_rpn_targets(synth_shards):
    rows = _rows(synth_shards)
    config = shapes()
    ours = decode_inputs(rows, image_size=config.image.max_dim)
    theirs = ShardBatchDecoder(**decoder_for(config, int(anchors_from_config(config).shape[0])))(rows)
    assert np.array_equal(ours["images"], theirs["images"]) and np.array_equal(ours["window"], theirs["windows"])
    assert ours["image_id"].tolist() == theirs["image_ids"].tolist()
    assert ours["height"].tolist() == theirs["heights"].tolist() and ours["width"].tolist() == theirs["widths"].tolist()
    assert np.allclose(ours["scale"], theirs["scales"]) and ours["scale"].dtype == np.float64
    assert not any(key.startswith("rpn") or key.startswith("gt_") for key in ours)
    assert ours["decode_s"].shape == (len(rows["image_id"]),)


def test_way_back_of_a_packed_batch_is_the_per_image_way_back():
    detections = _detections([2, 4])
    packed = pack_detections(detections, max_detections=6)
    meta = {"image_id": np.array([5, 9]), "scale": np.array([0.5, 2.0]), "window": np.array([[0, 0, 50, 40],
            [0, 0, 100, 100]]), "height": np.array([80, 50]), "width": np.array([100, 50])}
    ours = coco_results_of_batch({**packed, **meta}, coco_ids=[1, 3, 7, 9])
    for i, det in enumerate(detections):
        theirs = to_coco_results(det, image_id=int(meta["image_id"][i]), scale=float(meta["scale"][i]),
                                 window=meta["window"][i].tolist(), height=int(meta["height"][i]),
                                 width=int(meta["width"][i]), coco_ids=[1, 3, 7, 9])
        assert ours[i] == theirs and len(ours[i]) == len(det["boxes"])


def _one_loop_detections(shards: str, ckpt: str, min_confidence: float) -> tuple[list[dict], list[int]]:
    """The evaluation as it was before the stages (one actor doing everything in turn), in-process: the
    training decoder (RPN targets built and unused, float32 scales), the model, the way back and RLE."""
    manifest = read_manifest(shards)
    spec = model_spec(ckpt, categories=manifest["categories"])
    model = load_model(spec, min_confidence=min_confidence)
    coco_ids = list(CategoryMap.from_dict(spec.categories).coco_ids)
    batch = ShardBatchDecoder(**decoder_for(spec.config, int(model.anchors.shape[0])))(_rows(shards))
    batch = {k: torch.as_tensor(v) for k, v in batch.items()}
    step = spec.config.evaluate.batch_size
    results = []
    for first in range(0, len(batch["image_ids"]), step):
        sl = slice(first, first + step)
        with torch.no_grad():
            detections = model({"images": batch["images"][sl], "windows": batch["windows"][sl]})
        for j, det in enumerate(detections, start=first):
            results += to_coco_results(det, image_id=int(batch["image_ids"][j]), scale=float(batch["scales"][j]),
                                       window=batch["windows"][j].tolist(), height=int(batch["heights"][j]),
                                       width=int(batch["widths"][j]), coco_ids=coco_ids)
    return results, batch["image_ids"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("min_confidence", [0.0, 0.05])
def test_stages_give_the_metrics_of_the_one_loop_evaluation(synth_shards, trained_shapes, tmp_path, project_log,
                                                            min_confidence):
    """A trained shapes model, two inference actors: every metric within 1e-6 of the one-loop path's."""
    manifest = read_manifest(synth_shards)
    annotations = manifest["splits"]["val2017"]["annotations"]
    reference, image_ids = _one_loop_detections(synth_shards, trained_shapes, min_confidence)
    expected = evaluate_detections(annotations, reference, image_ids=image_ids).metrics
    # the model finds something (after 150 steps: bbox AP50 about 0.06 at 0.0, scores up to about 0.9)
    assert expected["bbox/AP50"] > 0 and max(d["score"] for d in reference) >= 0.5
    settings = replace(shapes().evaluate, min_confidence=min_confidence)
    result = evaluate(EvaluateRequest(shards=synth_shards, model_path=trained_shapes, out=str(tmp_path / "ev"),
                                      pictures=0, settings=settings),
                      RunContext(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", use_gpu=False, workers=2))
    assert set(result.metrics) == set(expected)
    wrong = {k: (result.metrics[k], expected[k]) for k in expected if abs(result.metrics[k] - expected[k]) > 1e-6}
    assert not wrong, wrong
    n = len(image_ids)
    assert any(f"inference: {n}/{n} images" in m for m in project_log.messages), project_log.messages
    assert set(result.timings) >= {"decode_s", "model_s", "way_back_s", "coco_eval_s", "wall_s"}


def test_a_threshold_applied_after_the_model_equals_the_models_own(one_thread):
    """`detect_images` of a model loaded at min_confidence 0 with min_scores t (and a limit) gives exactly what the
    same model at min_confidence t gives: the server's one model serves every request's threshold."""
    from mrcnn.model import build_model
    from pipelines.evaluation.inference import detect_images, eager_runner

    torch.manual_seed(0)
    model = build_model(shapes().override(["detection.min_confidence=0.0"]), num_classes=4).eval()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)]
    kwargs = {"image_ids": [1, 2], "min_dim": 128, "max_dim": 128, "coco_ids": [1, 2, 3]}
    run = eager_runner(model, torch.device("cpu"))
    everything = detect_images(run, images, **kwargs)
    scores = sorted(r["score"] for found in everything for r in found)
    threshold = scores[len(scores) // 2]
    trimmed = detect_images(run, images, min_scores=[threshold, threshold], limits=[20, 3], **kwargs)
    model.detection_settings = replace(model.detection_settings, min_confidence=threshold)
    own = detect_images(run, images, **kwargs)
    assert trimmed[0] == own[0] and trimmed[1] == own[1][:3]
    assert 0 < len(own[0]) + len(own[1]) < len(scores) and len(own[1]) > 3  # the threshold and the limit both cut
