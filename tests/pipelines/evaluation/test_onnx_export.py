"""`mrcnn-cli export`'s graph in onnxruntime (CPU) against eager PyTorch: the same detections on real photos at the
`coco` and `torchvision` presets (the seeded torchvision weights of tests/support/torchvision_reference.py, converted:
a model that detects a hundred things of several classes an image), and the same COCO AP for a trained shapes model.

Agreement asked of every image: count and class ids equal, boxes within 1e-3 of the canvas size, scores within 1e-4,
mask probabilities within 1e-3. The canvas is 384 px (the presets at `image.min_dim=image.max_dim=384`): the graph is
the same at 1024, the test a few times faster. Exports are shared by module-scoped fixtures.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from mrcnn.config import coco, shapes, torchvision_maskrcnn
from pipelines.data.coco import load_image_rgb, split_paths
from pipelines.data.coco_metrics import evaluate_detections
from pipelines.data.coco_results import run_model
from pipelines.evaluation.inference import PACKED, network_input
from pipelines.evaluation.onnx_export import OnnxModel, OnnxModelError, export_onnx
from pipelines.evaluation.predict import predict_images
from pipelines.models import load_model, model_spec
from tests.support.torchvision_reference import torchvision_reference

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 384  # a multiple of 128: the coco preset's flips need mirror-symmetric anchors
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory) -> str:
    """The seeded, non-degenerate torchvision Mask R-CNN as a `torchvision:FILE` SOURCE."""
    path = tmp_path_factory.mktemp("tv") / "maskrcnn.pth"
    torch.save(torchvision_reference().state_dict(), path)
    return f"torchvision:{path}"


@pytest.fixture(scope="module")
def photos(shared_data) -> list[Path]:
    return sorted((shared_data / "coco128" / "train2017").glob("*.jpg"))[:3]


def _canvases(paths: list[Path], size: int) -> tuple[np.ndarray, np.ndarray]:
    prepared = [network_input(load_image_rgb(p), min_dim=size, max_dim=size) for p in paths]
    return np.stack([c for c, _ in prepared]), np.asarray([g.window for _, g in prepared], np.int64)


def _exported(source: str, preset, tmp_path_factory, *, batch: int):
    """(eager model, the ONNX file) of `source` loaded at `preset` on a SIZE canvas, exported for `batch` images."""
    spec = model_spec(source)
    spec = replace(spec, config=preset.override([f"image.min_dim={SIZE}", f"image.max_dim={SIZE}"]))
    model = load_model(spec)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, spec, path, batch=batch)
    return model, path


@pytest.fixture(scope="module")
def coco_export(torchvision_file, tmp_path_factory):
    return _exported(torchvision_file, coco(), tmp_path_factory, batch=2)


@pytest.fixture(scope="module")
def torchvision_export(torchvision_file, tmp_path_factory):
    return _exported(torchvision_file, torchvision_maskrcnn(), tmp_path_factory, batch=1)


def assert_same_detections(eager: dict[str, np.ndarray], ours: dict[str, np.ndarray], *, size: int) -> None:
    """Every image of two packed outputs: the same detections within the tolerances of the module docstring."""
    assert set(ours) == set(PACKED)
    np.testing.assert_array_equal(ours["det_count"], eager["det_count"])
    for i, k in enumerate(eager["det_count"]):
        np.testing.assert_array_equal(ours["det_classes"][i, :k], eager["det_classes"][i, :k])
        np.testing.assert_allclose(ours["det_boxes"][i, :k], eager["det_boxes"][i, :k], rtol=0, atol=1e-3 * size)
        np.testing.assert_allclose(ours["det_scores"][i, :k], eager["det_scores"][i, :k], rtol=0, atol=1e-4)
        np.testing.assert_allclose(ours["det_masks"][i, :k], eager["det_masks"][i, :k], rtol=0, atol=1e-3)
        for key in PACKED[1:]:  # padding is zero
            assert not ours[key][i, k:].any(), key


def _non_degenerate(packed: dict[str, np.ndarray]) -> None:
    """A comparison that tells: many detections an image, of more than one class, masks that are not flat."""
    assert (packed["det_count"] >= 20).all(), packed["det_count"]
    for i, k in enumerate(packed["det_count"]):
        assert len(np.unique(packed["det_classes"][i, :k])) >= 2
        masks = packed["det_masks"][i, :k]
        assert ((masks > 0.9).any() and (masks < 0.1).any()), "mask probabilities do not spread"


@pytest.mark.parametrize("preset", ["coco", "torchvision"])
def test_onnxruntime_gives_eagers_detections_on_photos(preset, coco_export, torchvision_export, photos):
    """Three coco128 photos: the coco preset's graph for 2 images runs them as 2 + 1 (the second batch padded with an
    empty canvas, its rows dropped), the torchvision preset's graph for 1 image runs them one by one."""
    model, path = coco_export if preset == "coco" else torchvision_export
    images, windows = _canvases(photos, SIZE)
    eager = run_model(model, images, windows, CPU, max_detections=model.detection_settings.max_detections)
    _non_degenerate(eager)
    exported = OnnxModel(path, threads=1)
    assert exported.batch == (2 if preset == "coco" else 1) and exported.image_size == SIZE
    assert_same_detections(eager, exported(images, windows), size=SIZE)


def _nodes(path, op: str) -> list:
    """The graph's `op` nodes, those in subgraphs too (torchvision's batched_nms puts its NMS under an If)."""
    def walk(graph):
        for node in graph.node:
            yield node
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attribute.g)

    return [n for n in walk(onnx.load(str(path)).graph) if n.op_type == op]


def test_the_graph_is_the_whole_network_checked_with_its_settings_and_fixed_output_shapes(coco_export,
                                                                                          torchvision_export):
    """onnx.checker passes; the proposal and detection layers are NonMaxSuppression nodes in the graph; RoiAlign
    keeps each preset's pixel convention (roi.aligned: half_pixel for coco, output_half_pixel for torchvision's
    weights); the outputs are fixed [B, D, ...] arrays with a count, and the file carries the model's config."""
    for (model, path), mode, batch, name in ((coco_export, b"half_pixel", 2, "coco"),
                                             (torchvision_export, b"output_half_pixel", 1, "torchvision")):
        onnx.checker.check_model(str(path))
        assert len(_nodes(path, "NonMaxSuppression")) >= 2
        modes = {a.s for n in _nodes(path, "RoiAlign") for a in n.attribute
                 if a.name == "coordinate_transformation_mode"}
        assert modes == {mode}
        graph = onnx.load(str(path)).graph
        shapes_of = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
        d, m = model.detection_settings.max_detections, 2 * model.pool_settings.mask_pool_size
        assert shapes_of == {"det_count": [batch], "det_boxes": [batch, d, 4], "det_scores": [batch, d],
                             "det_classes": [batch, d], "det_masks": [batch, d, m, m]}
        meta = OnnxModel(path).meta
        assert (meta.config.name, meta.config.image.max_dim, meta.num_classes) == (name, SIZE, 81)
        assert meta.source.startswith("torchvision:") and len(meta.categories["categories"]) == 80


def test_bad_settings_and_files_are_refused_clearly(coco_export, tmp_path):
    model, path = coco_export
    spec = model_spec("torchvision:unused.pth")
    with pytest.raises(OnnxModelError, match="--opset must be at least 16"):
        export_onnx(model, spec, tmp_path / "a.onnx", opset=15)
    with pytest.raises(OnnxModelError, match="--batch must be at least 1"):
        export_onnx(model, spec, tmp_path / "a.onnx", batch=0)
    assert not (tmp_path / "a.onnx").exists()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    with pytest.raises(OnnxModelError, match=f"{junk}: not an ONNX model onnxruntime can load"):
        OnnxModel(junk)
    plain = tmp_path / "plain.onnx"  # a valid ONNX model that is not ours
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", onnx.TensorProto.FLOAT, [1])],
                                   [value("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(plain))
    with pytest.raises(OnnxModelError, match="not one exported by mrcnn-cli export"):
        OnnxModel(plain)
    with pytest.raises(OnnxModelError, match="exported at detection.min_confidence 0.7; a threshold below it"):
        OnnxModel(path, min_confidence=0.5)
    with pytest.raises(OnnxModelError, match=f"takes \\(3, {SIZE}, {SIZE}\\)"):
        OnnxModel(path)(np.zeros((1, 3, 64, 64), np.uint8), np.zeros((1, 4), np.int64))


# ---------------------------------------------------------------------------------------- a trained shapes model
LOW = 0.05  # the shapes model's detections down to this score (COCO AP's usual threshold): dozens, not a handful


@pytest.fixture(scope="module")
def shapes_export(trained_shapes, tmp_path_factory):
    """The trained shapes model exported for 2 images at detection.min_confidence LOW."""
    path = tmp_path_factory.mktemp("onnx") / "shapes.onnx"
    spec = model_spec(trained_shapes)
    spec = replace(spec, config=spec.config.override([f"detection.min_confidence={LOW}"]))
    export_onnx(load_model(spec), spec, path, batch=2)
    return path


def test_predict_onnx_scores_the_ap_of_eager_predict_on_the_validation_split(trained_shapes, shapes_export,
                                                                             synth_dataset, tmp_path):
    """predict --model-path and predict --onnx on the synthetic validation images: COCO segm and bbox AP within
    0.001, and result by result the same detections (boxes to predict's 0.01 px rounding, RLE masks IoU >= 0.99).
    The shared 150-step model is weak (bbox AP50 about 0.07, segm AP about 0 on this split): the result-by-result
    comparison is what makes the test tell."""
    import pycocotools.mask as mask_util

    annotations, images = split_paths(str(synth_dataset), "val2017")
    eager = predict_images([images], trained_shapes, tmp_path / "eager", device="cpu", threshold=LOW)
    ours = predict_images([images], None, tmp_path / "onnx", onnx=shapes_export)
    assert ours.images == eager.images
    assert ours.num_detections == eager.num_detections >= 2 * len(eager.images), ours.num_detections
    theirs, mine = (evaluate_detections(annotations, r.predictions) for r in (eager, ours))
    assert theirs.metrics["bbox/AP50"] > 0.03, theirs.metrics  # some detections are right
    for key in ("segm/AP", "bbox/AP", "segm/AP50", "bbox/AP50"):
        assert abs(mine.metrics[key] - theirs.metrics[key]) <= 1e-3, (key, mine.metrics[key], theirs.metrics[key])
    for a, b in zip(*(json.loads(Path(r.predictions).read_text()) for r in (eager, ours)), strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        np.testing.assert_allclose(b["bbox"], a["bbox"], rtol=0, atol=0.02)
        assert abs(a["score"] - b["score"]) <= 2e-5
        assert mask_util.iou([b["segmentation"]], [a["segmentation"]], [0])[0, 0] >= 0.99
    assert sorted(p.name for p in Path(ours.out).glob("*.png")) == sorted(p.name for p in Path(eager.out).glob("*.png"))


def test_an_image_with_no_detection_and_a_higher_threshold(trained_shapes, shapes_export, synth_dataset):
    """A shapes image beside an empty canvas: the graph's count 0 and zero rows for the empty one, as the model; and a
    threshold above the exported one, applied afterwards (`OnnxModel(min_confidence=...)`), gives the model's own
    detections at that threshold."""
    _, folder = split_paths(str(synth_dataset), "val2017")
    size = shapes().image.max_dim
    images, windows = _canvases(sorted(Path(folder).glob("*.jpg"))[:1], size)
    images = np.concatenate([images, np.zeros_like(images)])
    windows = np.concatenate([windows, [[0, 0, size, size]]])
    spec = model_spec(trained_shapes)

    def eager_at(threshold: float) -> dict[str, np.ndarray]:
        model = load_model(spec, min_confidence=threshold)
        return run_model(model, images, windows, CPU, max_detections=model.detection_settings.max_detections)

    low = eager_at(LOW)
    assert low["det_count"][0] >= 2 and low["det_count"][1] == 0, low["det_count"]
    assert_same_detections(low, OnnxModel(shapes_export)(images, windows), size=size)
    k = low["det_count"][0]
    ranked = np.sort(low["det_scores"][0, :k])
    # between two of image 0's scores (on one, float32 rounding would decide): keeps the better half
    higher = float(ranked[k // 2 - 1] + ranked[k // 2]) / 2
    high = eager_at(higher)
    assert 0 < high["det_count"][0] < k, (high["det_count"], k)
    assert_same_detections(high, OnnxModel(shapes_export, min_confidence=higher)(images, windows), size=size)
