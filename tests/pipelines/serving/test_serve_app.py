"""The Serve application on the session's local Ray, through a real HTTP client on 127.0.0.1: the answers equal
`predict`'s predictions.json on real photos (a trained shapes model, served from the Model Registry by
models:/NAME@champion, and a seeded torchvision file at its own image size), every bad request gets a 4xx naming
its problem and the next request answers, converted image modes answer like their RGB conversion, and a bounded
concurrent load is answered right and batched."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data.coco import load_image_rgb, split_paths
from pipelines.evaluation.predict import predict_images
from pipelines.infra.context import RunContext
from pipelines.serving.options import ServeOptions
from pipelines.serving.server import start_server
from tests.support.http import free_port, multipart, request
from tests.support.trained_shapes import train_tiny_shapes

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TORCHVISION_SIZE = ("image.min_dim=320", "image.max_dim=512")  # torchvision:FILE at its own (smaller) image size
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def models(synth_dataset, tmp_path_factory) -> dict[str, str]:
    """The two model sources: a shapes model trained 30 steps, and torchvision's Mask R-CNN, seeded random weights."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("torchvision") / "maskrcnn.pth"
    torch.save(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict(), path)
    return {"shapes": train_tiny_shapes(synth_dataset, tmp_path_factory.mktemp("tiny")),
            "torchvision": f"torchvision:{path}"}


@pytest.fixture(scope="module")
def registered(models, tmp_path_factory) -> tuple[str, str]:
    """The shapes model logged as an MLflow model to a run of a SQLite store and registered as `tiny` (what
    `train --register tiny` does): (its models:/tiny@champion URI, the store)."""
    from mrcnn.config import shapes
    from pipelines.infra import tracking
    from pipelines.training.train import log_final_model

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    run_id = tracking.create_run(uri, run_name="train")
    log_final_model(uri, run_id, models["shapes"], config=shapes(), num_classes=4)
    tracking.finish_run(uri, run_id)
    assert tracking.register_model(uri, run_id, "tiny", tags={"segm_AP": 0.5}) == 1
    assert tracking.register_model(uri, run_id, "tiny") == 2  # a second version takes the alias
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert int(client.get_model_version_by_alias("tiny", "champion").version) == 2
    assert client.get_model_version("tiny", "1").tags["segm_AP"] == "0.5"
    return "models:/tiny@champion", uri


@pytest.fixture(scope="module")
def server(ray_session, models, registered):
    """Both models served side by side (/shapes, /torchvision) on one Serve instance, the shapes model from the
    Model Registry (models:/tiny@champion); shut down at the end."""
    from ray import serve

    port, ctx = free_port(), RunContext(use_gpu=False)
    source, store = registered
    urls = {
        "shapes": start_server(ServeOptions(source, tracking_uri=store, port=port, cpus_per_replica=1, max_batch=4,
                                            batch_wait_ms=50, max_pixels=MAX_PIXELS), ctx,
                               name="shapes", route_prefix="/shapes"),
        "torchvision": start_server(ServeOptions(models["torchvision"], overrides=TORCHVISION_SIZE, port=port,
                                                 cpus_per_replica=1, max_batch=2), ctx,
                                    name="torchvision", route_prefix="/torchvision"),
    }
    yield urls
    serve.shutdown()


@pytest.fixture(scope="module")
def photos(shared_data) -> list[Path]:
    return sorted((shared_data / "coco128" / "train2017").glob("*.jpg"))[:3]


def predict(url: str, path: Path, **query) -> tuple[int, dict, dict]:
    return request(f"{url}/v1/predict", "POST", path.read_bytes(), "image/jpeg", query=query or None)


@pytest.mark.parametrize("which", ["shapes", "torchvision"])
def test_answers_equal_predicts_predictions_json_on_photos(server, models, photos, tmp_path, which):
    """At threshold 0 and at the median score of those answers (some kept, some not), each photo's detections
    equal predict's for it: categories, scores, boxes and RLEs, in the same order."""
    overrides = TORCHVISION_SIZE if which == "torchvision" else ()
    url = server[which]
    status, info, _ = request(f"{url}/v1/model")
    assert status == 200 and info["source"] == ("models:/tiny@champion" if which == "shapes" else models[which])
    answers0 = [predict(url, p, score_threshold=0.0) for p in photos]
    scores = sorted(d["score"] for _, a, _ in answers0 for d in a["detections"])
    assert len(scores) > 2 * len(photos), scores  # enough detections for the comparison to tell
    middle = float(scores[len(scores) // 2])
    counts = []
    for threshold in (0.0, middle):
        # one image a model call, as each request here runs (a CPU convolution over a batch of 3 can differ from 3
        # alone in the 5th digit of a score: the load test below compares batched answers with that tolerance)
        result = predict_images(photos, models[which], tmp_path / f"t{threshold}", threshold=threshold,
                                device="cpu", overrides=overrides, batch_size=1)
        expected = json.loads(Path(result.predictions).read_text())
        counts.append(len(expected))
        for path in photos:
            status, answer, _ = predict(url, path, score_threshold=threshold)
            assert status == 200, answer
            height, width = load_image_rgb(path).shape[:2]
            assert (answer["width"], answer["height"]) == (width, height)
            mine = [{k: d[k] for k in ("category_id", "score", "bbox", "segmentation")} for d in answer["detections"]]
            theirs = [{k: d[k] for k in ("category_id", "score", "bbox", "segmentation")} for d in expected
                      if d["image_id"] == int(path.stem)]
            assert mine == theirs, f"{which} {path.name} at {threshold}: {len(mine)} vs {len(theirs)} detections"
            names = {c["id"]: c["name"] for c in info["categories"]}
            assert all(d["category"] == names[d["category_id"]] for d in answer["detections"])
    assert counts[0] == len(scores) and 0 < counts[1] < counts[0]  # the middle threshold kept some, not all


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG")
    return out.getvalue()


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_next_request_answers(server, synth_dataset):
    url = server["shapes"]
    _, images = split_paths(str(synth_dataset), "val2017")
    good = sorted(Path(images).glob("*.jpg"))[0].read_bytes()
    bomb = _png(Image.new("L", (2000, 1000)))  # 2 megapixels over the 1 MP limit, a few kB of file
    form, form_type = multipart({"picture": ("a.jpg", good, "image/jpeg")})
    cases = [
        ("empty body", b"", "image/jpeg", {}, 400, "empty body"),
        ("not an image", b"hello, world", "image/png", {}, 400, "not a recognised image"),
        ("truncated JPEG", good[: len(good) // 2], "image/jpeg", {}, 400, "truncated or corrupt"),
        ("pixel limit", bomb, "image/png", {}, 413, "2000 x 1000 = 2000000 pixels, more than the limit 1000000"),
        ("content type", good, "text/plain", {}, 415, "'text/plain' is not accepted"),
        ("no content type", good, None, {}, 415, "'(none)' is not accepted"),
        ("multipart without the field", form, form_type, {}, 400, "without the field 'image'"),
        ("threshold above 1", good, "image/jpeg", {"score_threshold": 1.5}, 422, "score_threshold: 1.5 is outside"),
        ("threshold below 0", good, "image/jpeg", {"score_threshold": -0.1}, 422, "score_threshold: -0.1 is outside"),
        ("threshold not a number", good, "image/jpeg", {"score_threshold": "high"}, 422, "score_threshold"),
        ("negative max_detections", good, "image/jpeg", {"max_detections": -1}, 422, "max_detections: -1 is negative"),
        ("too thin to resize", _png(Image.new("RGB", (2000, 1))), "image/png", {}, 422, "size must be positive"),
    ]
    for name, body, kind, query, status, words in cases:
        got, answer, _ = request(f"{url}/v1/predict", "POST", body, kind, query=query)
        assert got == status and words in answer["error"], (name, got, answer)
    status, reference, _ = request(f"{url}/v1/predict", "POST", good, "image/jpeg", query={"score_threshold": 0})
    assert status == 200 and reference["detections"]
    form, form_type = multipart({"image": ("a.jpg", good, "image/jpeg")})
    status, answer, _ = request(f"{url}/v1/predict", "POST", form, form_type, query={"score_threshold": 0})
    assert status == 200 and answer == reference  # the multipart form gives the same answer as the body


def test_converted_images_answer_like_their_rgb_conversion(server, synth_dataset):
    """Grayscale, CMYK, 16-bit and alpha images are converted as preprocess converts them: the answer equals the
    answer to the converted RGB image sent as PNG."""
    url = server["shapes"]
    _, images = split_paths(str(synth_dataset), "val2017")
    rgb = Image.open(sorted(Path(images).glob("*.jpg"))[1]).convert("RGB")
    gray16 = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16))
    variants = {"L": (_png(rgb.convert("L")), rgb.convert("L").convert("RGB")),
                "CMYK": (_jpeg(rgb.convert("CMYK")), Image.open(io.BytesIO(_jpeg(rgb.convert("CMYK")))).convert("RGB")),
                "I;16": (_png(gray16), rgb.convert("L").convert("RGB")),
                "RGBA": (_png(rgb.convert("RGBA")), rgb)}
    for mode, (data, converted) in variants.items():
        status, answer, _ = request(f"{url}/v1/predict", "POST", data, "image/png", query={"score_threshold": 0})
        status_rgb, expected, _ = request(f"{url}/v1/predict", "POST", _png(converted), "image/png",
                                          query={"score_threshold": 0})
        assert status == status_rgb == 200 and answer["detections"] == expected["detections"], mode
        assert answer["detections"], mode


def test_a_bounded_load_is_answered_right_and_batched(server, models, synth_dataset):
    """200 requests from 16 threads over 4 images: every answer 200 and equal to the image's answer alone, and
    the model deployment ran batches of more than one image (X-Batch-Size, and the replica's stats)."""
    url = server["shapes"]
    _, images = split_paths(str(synth_dataset), "val2017")
    bodies = [p.read_bytes() for p in sorted(Path(images).glob("*.jpg"))[:4]]
    alone = [request(f"{url}/v1/predict", "POST", b, "image/jpeg", query={"score_threshold": 0})[1] for b in bodies]

    def send(i: int) -> tuple[int, int, dict, str]:
        status, answer, headers = request(f"{url}/v1/predict", "POST", bodies[i % 4], "image/jpeg",
                                          query={"score_threshold": 0})
        return i, status, answer, headers.get("x-batch-size", "0")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, range(200)))
    assert [status for _, status, _, _ in results] == [200] * 200
    for i, _, answer, _ in results:
        assert_same_detections(answer, alone[i % 4], i)
    assert max(int(size) for *_, size in results) > 1
    status, info, _ = request(f"{url}/v1/model")
    assert status == 200 and max(int(k) for k in info["replica_stats"]["batch_sizes"]) > 1, info


def assert_same_detections(answer: dict, expected: dict, what) -> None:
    """The same detections up to the numerical noise of a batched CPU model call: same categories in the same
    order, scores within 1e-3, boxes within 0.5 px, masks of IoU >= 0.9."""
    import pycocotools.mask as mask_util

    mine, theirs = answer["detections"], expected["detections"]
    assert [d["category_id"] for d in mine] == [d["category_id"] for d in theirs], what
    for a, b in zip(mine, theirs, strict=True):
        assert abs(a["score"] - b["score"]) <= 1e-3 and np.allclose(a["bbox"], b["bbox"], atol=0.5), (what, a, b)
        iou = mask_util.iou([a["segmentation"]], [b["segmentation"]], [0])[0, 0]
        assert iou >= 0.9 or not mask_util.area(b["segmentation"]), (what, iou)


def test_health_and_openapi(server):
    url = server["shapes"]
    assert request(f"{url}/v1/health")[:2] == (200, {"status": "ok"})
    status, schema, _ = request(f"{url}/openapi.json")
    assert status == 200
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"image/jpeg", "image/png", "multipart/form-data"}
    assert {p["name"] for p in schema["paths"]["/v1/predict"]["post"]["parameters"]} == {"score_threshold",
                                                                                         "max_detections"}
    assert request(f"{url}/docs")[0] == 200


def _model_replicas(app: str) -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#ModelDeployment#")}


def test_a_replica_that_dies_is_replaced_and_the_next_requests_succeed(server, synth_dataset):
    """Last in this module (it kills the shapes model's replica): Serve starts another; until it is up a request
    gets a 5xx or waits, never a 4xx; then the answer is the one before."""
    import time

    import ray

    url = server["shapes"]
    _, images = split_paths(str(synth_dataset), "val2017")
    good = sorted(Path(images).glob("*.jpg"))[0].read_bytes()
    status, before, _ = request(f"{url}/v1/predict", "POST", good, "image/jpeg", query={"score_threshold": 0})
    (name,) = _model_replicas("shapes")
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    statuses = []
    for _ in range(300):  # a bound, not a deadline: Serve's health check finds the dead replica and replaces it
        status, answer, _ = request(f"{url}/v1/predict", "POST", good, "image/jpeg", query={"score_threshold": 0})
        statuses.append(status)
        if status == 200:
            break
        time.sleep(1)
    assert statuses[-1] == 200 and all(s >= 500 for s in statuses[:-1]), statuses
    assert_same_detections(answer, before, "after the replacement")
    assert _model_replicas("shapes") and name not in _model_replicas("shapes")
