"""The command line through typer's CliRunner: every command's help has an example; `inspect gt` and `predict`
run end to end on the synthetic dataset without shards or Ray."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from mrcnn.config import shapes
from mrcnn.model import build_model
from pipelines.data.coco import read_split, split_paths
from pipelines.inspection.panels import panel_px, picture_size
from pipelines.training.checkpoints import save_checkpoint

runner = CliRunner()


def _commands() -> list[str]:
    return [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]


def test_the_new_commands_are_registered():
    assert {"inspect", "predict", "train", "evaluate", "preprocess"} <= set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_every_command_help_shows_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and "mrcnn-cli" in result.output



def test_help_says_preprocess_keeps_the_source_image_bytes():
    """Shard schema v2 stores each image file's bytes; the reader resizes (docs/design.md, "What a shard row holds")."""
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "source image bytes" in result.output and "resized images" not in result.output

def test_inspect_gt_from_a_dataset(synth_dataset, tmp_path):
    out = tmp_path / "gt.png"
    result = runner.invoke(app, ["inspect", "gt", "--dataset", str(synth_dataset), "--split", "val2017",
                                 "--index", "1", "--config", "shapes", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"gt: {out}" in result.output
    with Image.open(out) as im:
        assert im.size == picture_size(1, 2, panel_px(128))


def test_inspect_without_data_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["inspect", "gt", "--out", str(tmp_path / "gt.png")])
    assert result.exit_code == 2 and "--shards" in result.output
    assert not (tmp_path / "gt.png").exists()


def test_predict_on_image_files(synth_dataset, tmp_path, one_thread):
    annotations, images = split_paths(str(synth_dataset), "val2017")
    categories = read_split(annotations, images).categories
    torch.manual_seed(0)
    model = build_model(shapes(), num_classes=categories.num_classes)
    ckpt = save_checkpoint(tmp_path / "ckpt", model=model, optimizer=None, scheduler=None, step=0, epoch=0,
                           batch_in_epoch=0, meta={"config": shapes().to_dict(), "categories": categories.to_dict(),
                                                   "num_classes": categories.num_classes})
    files = sorted(str(p) for p in (synth_dataset / "val2017").glob("*.jpg"))[:2]
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", *files, "--model-path", str(ckpt), "--out", str(out),
                                 "--threshold", "0.0", "--no-gpu"])
    assert result.exit_code == 0, result.output
    detections = json.loads((out / "predictions.json").read_text())
    assert f"2 images, {len(detections)} detections" in result.output and detections
    assert {d["image_id"] for d in detections} <= {int(p.rsplit("/", 1)[1].split(".")[0]) for p in files}
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.rsplit("/", 1)[1].replace(".jpg", ".png")
                                                               for p in files)


def test_the_cli_choices_are_the_codes_own():
    """The choices typed into cli.py (for a fast --help) are exactly what the stages accept."""
    import typing

    import cli
    from mrcnn.config import shapes
    from pipelines.dag import stage_config_fields
    from pipelines.evaluation.coco_eval import BACKENDS
    from pipelines.inspection.command import STAGES

    assert typing.get_args(cli.Backend) == BACKENDS
    assert typing.get_args(cli.InspectStage) == (*STAGES, "all")
    assert typing.get_args(cli.DagStage) == tuple(stage_config_fields(shapes()))


@pytest.mark.parametrize("args, allowed", [
    (["train", "--shards", "s", "--layers", "x"], "'heads', '3+', '4+', '5+', 'all'"),
    (["evaluate", "--shards", "s", "--model-path", "m", "--backend", "cocoapi"], "'pycocotools', 'faster-coco-eval'"),
    (["run", "--dataset", "d", "--force", "trian"], "'preprocess', 'train', 'evaluate'"),
    (["inspect", "gtt", "--out", "o.png"], "'gt', 'anchors'"),
    (["train", "--shards", "s", "--config", "shapes", "--set", "train.optimizer=lamb"], "'sgd', 'adamw'"),
])
def test_bad_choices_are_refused_before_any_work_naming_what_is_allowed(args, allowed):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())  # rich's error box, unwrapped
    assert allowed in text, result.output


def test_synth_writes_a_coco_dataset(tmp_path):
    result = runner.invoke(app, ["synth", str(tmp_path / "d"), "--train", "3", "--val", "2", "--seed", "4"])
    assert result.exit_code == 0, result.output
    for split, n in (("train2017", 3), ("val2017", 2)):
        source = read_split(*split_paths(str(tmp_path / "d"), split))
        assert len(source.records) == n and not source.skipped


@pytest.mark.parametrize("args, message", [
    (["train", "--shards", "s", "--config", "nosuch"], "neither a preset (coco, shapes) nor a file"),
    (["train", "--shards", "s", "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
    (["train", "--shards", "s", "--set", "train.batch_size=0"], "'train.batch_size': 0 is out of range"),
    (["run", "--dataset", "d", "--placement-strategy", "everywhere"], "one of PACK, SPREAD"),
    (["synth", "out", "--train", "x"], "Invalid value for '--train'"),
])
def test_bad_arguments_are_usage_errors_that_name_the_argument(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", " ").split()), result.output


@pytest.mark.slow
def test_demo_short_variant_then_run_skips_every_stage(ray_session, tmp_path, monkeypatch):
    """`mrcnn-cli demo` end to end at a few steps (the real command, on the session's Ray), then `mrcnn-cli run` with
    the same data, settings and work dir finds every stage up to date."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = ["--set", "train.steps=2", "--set", "train.log_every=1", "--set", "train.warmup_steps=1"]
    demo = runner.invoke(app, ["demo", "--out", str(tmp_path), "--train", "8", "--val", "4", "--workers", "1",
                               *steps])
    assert demo.exit_code == 0, demo.output
    assert "segm AP" in demo.output and "Average Precision" in demo.output and "mlflow ui" in demo.output
    assert (tmp_path / "shapes" / "annotations" / "instances_train2017.json").is_file()
    rerun = runner.invoke(app, ["run", "--dataset", str(tmp_path / "shapes"), "--config", "shapes",
                                "--set", "train.cache_data=true", *steps, "--workers", "1", "--no-gpu",
                                "--work-dir", str(tmp_path / "pipeline")])
    assert rerun.exit_code == 0, rerun.output
    assert "ran: nothing; skipped: preprocess, train, evaluate" in rerun.output


def test_torchvision_files_that_fit_neither_format_are_refused_naming_their_keys(tmp_path):
    """`predict --model-path torchvision:FILE` and `train --init torchvision:FILE` (on the driver, before Ray starts)
    refuse a state dict that is neither torchvision's Mask R-CNN nor its ResNet, naming its first keys."""
    from pipelines.data.categories import CategoryMap
    from pipelines.data.shards import SCHEMA_VERSION

    bad = tmp_path / "bad.pt"
    torch.save({"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(1)}, bad)
    image = tmp_path / "1.png"
    Image.new("RGB", (40, 30)).save(image)
    words = "fits neither torchvision's Mask R-CNN state dict"
    result = runner.invoke(app, ["predict", str(image), "--model-path", f"torchvision:{bad}", "--out",
                                 str(tmp_path / "out"), "--no-gpu"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and words in text and "first keys encoder.weight, decoder.bias" in text, result.output
    config = shapes()
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "fingerprint": config.fingerprint(), "shard_fields": config.shard_fields(),
        "splits": {"train2017": {"num_images": 4}},
        "categories": CategoryMap((1, 3), ("circle", "square")).to_dict()}))
    result = runner.invoke(app, ["train", "--shards", str(shards), "--config", "shapes",
                                 "--init", f"torchvision:{bad}"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "--init" in text and words in text and "encoder.weight" in text, result.output


def test_flips_with_off_centre_anchors_are_refused_before_any_work():
    result = runner.invoke(app, ["train", "--shards", "nowhere", "--config", "shapes",
                                 "--set", "rpn.anchor_offset=0.0"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "'train.flip': flips need mirror-symmetric anchors" in text, result.output
