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
