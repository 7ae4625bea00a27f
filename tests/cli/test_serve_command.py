"""`mrcnn-cli serve`: the real console command in a subprocess (its own local Ray) prints its address when ready,
answers over HTTP, and exits 0 on Ctrl-C (SIGINT); `--write-config` writes what `serve deploy` takes; bad options
and settings are refused in a short message before anything starts."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from cli import app
from mrcnn.config import shapes
from mrcnn.model import build_model
from pipelines.data.categories import CategoryMap
from pipelines.data.synth import CATEGORIES
from pipelines.training.checkpoints import save_checkpoint
from tests.support.http import free_port, request

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A shapes model with seeded random weights and the synthetic dataset's categories (what is served does not
    matter here, only that it is)."""
    torch.manual_seed(0)
    categories = CategoryMap.from_coco(list(CATEGORIES))
    model = build_model(shapes(), num_classes=categories.num_classes).eval()
    meta = {"config": shapes().to_dict(), "categories": categories.to_dict(), "num_classes": categories.num_classes}
    return str(save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", model=model, optimizer=None,
                               scheduler=None, step=0, epoch=0, batch_in_epoch=0, meta=meta))


@pytest.mark.slow
def test_serve_prints_its_address_answers_and_exits_0_on_ctrl_c(checkpoint, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--model-path", checkpoint, "--no-gpu", "--port", str(port),
         "--cpus-per-replica", "1", "--max-batch", "2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # until the address is printed (or the process ends: EOF)
            lines.append(line)
            if "serving" in line and f"http://127.0.0.1:{port}" in line:
                break
        assert proc.poll() is None, "".join(lines)
        assert request(f"http://127.0.0.1:{port}/v1/health")[:2] == (200, {"status": "ok"})
        png = io.BytesIO()
        Image.new("RGB", (96, 64), (200, 30, 30)).save(png, "PNG")
        status, answer, _ = request(f"http://127.0.0.1:{port}/v1/predict", "POST", png.getvalue(), "image/png")
        assert status == 200 and (answer["width"], answer["height"]) == (96, 64), answer
        assert answer["model"]["source"] == checkpoint
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest


def test_write_config_is_a_serve_deploy_config_whose_args_give_the_options_back(checkpoint, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serving.options import ServeOptions

    path = tmp_path / "serve.yaml"
    result = runner.invoke(app, ["serve", "--model-path", checkpoint, "--autoscale", "1:3", "--max-batch", "4",
                                 "--port", "8123", "--set", "detection.min_confidence=0.25",
                                 "--tracking-uri", "http://mlflow:5000", "--write-config", str(path)])
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.parse_obj(data)  # what `serve deploy` validates
    (application,) = schema.applications
    assert application.import_path == "pipelines.serving.app:app_builder" and schema.http_options.port == 8123
    options = ServeOptions.from_args(application.args)
    assert options == ServeOptions(checkpoint, overrides=("detection.min_confidence=0.25",), autoscale=(1, 3),
                                   max_batch=4, port=8123, tracking_uri="http://mlflow:5000")
    assert options.spec().config.detection.min_confidence == 0.25


@pytest.mark.parametrize("args, words", [
    (["--autoscale", "3:1"], ["--autoscale 3:1"]),
    (["--autoscale", "many"], ["--autoscale 'many'", "MIN:MAX"]),
    (["--max-batch", "0"], ["--max-batch 0: at least 1"]),
    (["--set", "backbone.depth=50"], ["--set", "backbone.depth=50 (the model's: 18)", "would contradict"]),
    (["--set", "image.max_dim=256"], ["--set", "image.max_dim=256 (the model's: 128)"]),
    (["--config", "coco"], ["--config coco", "carries its own config"]),
])
def test_bad_serve_options_are_refused_before_anything_starts(checkpoint, tmp_path, args, words):
    result = runner.invoke(app, ["serve", "--model-path", checkpoint, *args, "--write-config",
                                 str(tmp_path / "s.yaml")])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and all(w in text for w in words), result.output
    assert not (tmp_path / "s.yaml").exists()


def test_predict_takes_inference_settings_and_refuses_the_models_architecture(checkpoint, tmp_path):
    """`predict --set`: an inference setting changes what it keeps (threshold 0 via detection.min_confidence keeps the
    model's max_detections, 7 here); a backbone setting is refused naming it, before any image is read."""
    image = tmp_path / "1.png"
    Image.new("RGB", (80, 60), (30, 160, 60)).save(image)
    result = runner.invoke(app, ["predict", str(image), "--model-path", checkpoint, "--out", str(tmp_path / "out"),
                                 "--no-gpu", "--set", "detection.min_confidence=0.0",
                                 "--set", "detection.max_detections=7"])
    assert result.exit_code == 0 and "1 images, 7 detections" in result.output, result.output
    result = runner.invoke(app, ["predict", str(image), "--model-path", checkpoint, "--out", str(tmp_path / "out2"),
                                 "--set", "backbone.depth=50"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "--set" in text and "backbone.depth=50 (the model's: 18)" in text, result.output
    assert not (tmp_path / "out2").exists()


def test_evaluate_refuses_a_setting_that_contradicts_the_model_before_ray_starts(checkpoint, tmp_path):
    from tests.support.manifest_only import manifest_only_shards

    shards = manifest_only_shards(tmp_path, split="val2017", categories=CategoryMap.from_coco(list(CATEGORIES)))
    result = runner.invoke(app, ["evaluate", "--shards", str(shards), "--model-path", checkpoint,
                                 "--set", "roi.fc_dim=1024", "--out", str(tmp_path / "eval")])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "--set" in text and "roi.fc_dim=1024 (the model's: 256)" in text, result.output


def test_inspect_with_a_model_takes_its_set_as_the_models_inference_settings(checkpoint, synth_dataset, tmp_path):
    result = runner.invoke(app, ["inspect", "predictions", "--dataset", str(synth_dataset), "--model-path", checkpoint,
                                 "--set", "rpn.anchor_stride=2", "--out", str(tmp_path / "p.png")])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "rpn.anchor_stride=2 (the model's: 1)" in text, result.output
    result = runner.invoke(app, ["inspect", "predictions", "--dataset", str(synth_dataset), "--model-path", checkpoint,
                                 "--set", "detection.min_confidence=0.0", "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 0 and (tmp_path / "p.png").is_file(), result.output
