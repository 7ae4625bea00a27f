"""The command line through typer's CliRunner: every command's help has an example; `inspect gt` and `predict`
run end to end on the synthetic dataset without shards or Ray."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from cli import app
from mrcnn.config import shapes
from mrcnn.model import build_model
from pipelines.data.coco import read_split, split_paths
from pipelines.inspection.panels import panel_px, picture_size
from pipelines.training.checkpoints import save_checkpoint
from tests.support.manifest_only import manifest_only_shards

runner = CliRunner()


def _commands() -> list[str]:
    return [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]


def test_the_new_commands_are_registered():
    assert {"inspect", "predict", "train", "evaluate", "preprocess", "tune"} <= set(_commands())


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
    from pipelines.data.coco_metrics import BACKENDS
    from pipelines.inspection.command import STAGES

    assert typing.get_args(cli.Backend) == BACKENDS
    assert typing.get_args(cli.InspectStage) == (*STAGES, "all")
    assert typing.get_args(cli.DagStage) == tuple(stage_config_fields(shapes()))
    from pipelines.cli_options import TuneMetric, TuneScheduler
    from pipelines.training.tune import METRICS, SCHEDULERS

    assert typing.get_args(TuneScheduler) == SCHEDULERS and typing.get_args(TuneMetric) == tuple(METRICS)
    from pipelines.cli_options import DEFAULT_EXPERIMENT
    from pipelines.infra.tracking import DEFAULT_EXPERIMENT as TRACKING_DEFAULT

    assert DEFAULT_EXPERIMENT == TRACKING_DEFAULT


@pytest.mark.parametrize("args, allowed", [
    (["train", "--shards", "s", "--layers", "x"], "'heads', '3+', '4+', '5+', 'all'"),
    (["evaluate", "--shards", "s", "--model-path", "m", "--backend", "cocoapi"], "'pycocotools', 'faster-coco-eval'"),
    (["run", "--dataset", "d", "--force", "trian"], "'preprocess', 'train', 'evaluate'"),
    (["tune", "--shards", "s", "--search", "train.lr=choice(0.1)", "--scheduler", "hyperband"], "'asha', 'fifo'"),
    (["tune", "--shards", "s", "--search", "train.lr=choice(0.1)", "--metric", "mAP"], "'val_loss', 'segm_AP'"),
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


def test_export_then_predict_onnx_writes_what_predict_writes(synth_dataset, tmp_path, one_thread):
    """`export` an (untrained, threshold 0) shapes checkpoint for 2 images, then `predict --onnx` on 3 images (a full
    graph batch and a padded one): the same pictures and, result by result, the same COCO results as
    `predict --model-path`."""
    annotations, images = split_paths(str(synth_dataset), "val2017")
    categories = read_split(annotations, images).categories
    config = shapes().override(["detection.min_confidence=0.0"])
    torch.manual_seed(0)
    model = build_model(config, num_classes=categories.num_classes)
    ckpt = save_checkpoint(tmp_path / "ckpt", model=model, optimizer=None, scheduler=None, step=0, epoch=0,
                           batch_in_epoch=0, meta={"config": config.to_dict(), "categories": categories.to_dict(),
                                                   "num_classes": categories.num_classes})
    onnx_file = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", "--model-path", str(ckpt), "--out", str(onnx_file), "--batch", "2"])
    assert result.exit_code == 0 and f"{onnx_file} (" in result.output and "batch 2, opset 17" in result.output, \
        result.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("model")] == ["model.onnx"]  # no temporary left
    files = sorted(str(p) for p in (synth_dataset / "val2017").glob("*.jpg"))[:3]
    outputs = {}
    for name, how in (("eager", ["--model-path", str(ckpt), "--no-gpu"]), ("onnx", ["--onnx", str(onnx_file)])):
        result = runner.invoke(app, ["predict", *files, *how, "--out", str(tmp_path / name)])
        assert result.exit_code == 0 and "3 images" in result.output, result.output
        outputs[name] = json.loads((tmp_path / name / "predictions.json").read_text())
        assert sorted(p.name for p in (tmp_path / name).glob("*.png")) == sorted(
            p.rsplit("/", 1)[1].replace(".jpg", ".png") for p in files)
    eager, ours = outputs["eager"], outputs["onnx"]
    assert len(eager) == len(ours) == 3 * config.detection.max_detections
    for a, b in zip(eager, ours, strict=True):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"], strict=True)) <= 0.02
        assert abs(a["score"] - b["score"]) <= 2e-5


def test_export_and_predict_refuse_a_source_that_is_not_a_model_alike(tmp_path):
    """A SOURCE that is not a model: `export` ends in predict's message, naming --model-path and the folder, and writes
    nothing; `predict` wants exactly one of --model-path and --onnx; a file that is not an export is named."""
    (tmp_path / "ckpt").mkdir()
    image = tmp_path / "1.png"
    Image.new("RGB", (40, 30)).save(image)
    source = str(tmp_path / "ckpt")
    exported = runner.invoke(app, ["export", "--model-path", source, "--out", str(tmp_path / "m.onnx")])
    predicted = runner.invoke(app, ["predict", str(image), "--model-path", source, "--out", str(tmp_path / "p")])
    line = _short_error(exported, "--model-path", source, "not a checkpoint").splitlines()[0]
    assert line == _short_error(predicted, "--model-path", source).splitlines()[0]
    assert exported.output == predicted.output
    assert not (tmp_path / "m.onnx").exists()
    for how in ([], ["--model-path", source, "--onnx", str(tmp_path / "m.onnx")]):
        result = runner.invoke(app, ["predict", str(image), *how, "--out", str(tmp_path / "p")])
        assert result.exit_code == 2 and "one of --model-path and --onnx" in result.output, result.output
    result = runner.invoke(app, ["predict", str(image), "--onnx", str(image), "--out", str(tmp_path / "p")])
    _short_error(result, f"{image}: not an ONNX model onnxruntime can load")


def test_torchvision_files_that_fit_neither_format_are_refused_naming_their_keys(tmp_path):
    """`predict --model-path torchvision:FILE` and `train --init torchvision:FILE` (on the driver, before Ray starts)
    refuse a state dict that is neither torchvision's Mask R-CNN nor its ResNet, naming its first keys."""
    bad = tmp_path / "bad.pt"
    torch.save({"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(1)}, bad)
    image = tmp_path / "1.png"
    Image.new("RGB", (40, 30)).save(image)
    words = "fits neither torchvision's Mask R-CNN state dict"
    result = runner.invoke(app, ["predict", str(image), "--model-path", f"torchvision:{bad}", "--out",
                                 str(tmp_path / "out"), "--no-gpu"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and words in text and "first keys encoder.weight, decoder.bias" in text, result.output
    shards = manifest_only_shards(tmp_path)
    result = runner.invoke(app, ["train", "--shards", str(shards), "--config", "shapes",
                                 "--init", f"torchvision:{bad}"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "--init" in text and words in text and "encoder.weight" in text, result.output


def test_backbone_weights_that_do_not_fit_are_a_users_error_naming_the_file(tmp_path):
    """`train --backbone-weights FILE` with a file that is not a ResNet state dict is refused on the driver, before
    Ray starts, in a short message naming --backbone-weights and the file (mrcnn's BackboneWeightsError)."""
    bad = tmp_path / "resnet.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, bad)
    shards = manifest_only_shards(tmp_path)
    result = runner.invoke(app, ["train", "--shards", str(shards), "--config", "shapes",
                                 "--backbone-weights", str(bad)])
    _short_error(result, "--backbone-weights", str(bad))


def test_flips_with_off_centre_anchors_are_refused_before_any_work():
    result = runner.invoke(app, ["train", "--shards", "nowhere", "--config", "shapes",
                                 "--set", "rpn.anchor_offset=0.0"])
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "'train.flip': flips need mirror-symmetric anchors" in text, result.output


# ------------------------------------------------------------------------------ one error-to-message mapping
def _short_error(result, *words: str) -> str:
    """The output of a command that a user's error ended: exit status 2, no traceback, a few lines naming `words`."""
    text = " ".join(result.output.replace("│", " ").split())  # rich's error box, unwrapped
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) <= 12, result.output
    for word in words:
        assert word in text, result.output
    return text


@pytest.mark.parametrize("command, args, words", [
    ("train", ["--shards", "{tmp}/absent", "--config", "shapes"], ["{tmp}/absent", "not preprocessed"]),
    ("preprocess", ["--dataset", "{tmp}/absent", "--split", "val2017", "--out", "{tmp}/shards", "--config", "shapes"],
     ["annotations file not found", "{tmp}/absent/annotations/instances_val2017.json"]),
    ("evaluate", ["--shards", "{tmp}/absent", "--model-path", "{tmp}/ckpt"], ["{tmp}/absent", "not preprocessed"]),
    ("inspect", ["gt", "--shards", "{tmp}/absent", "--out", "{tmp}/gt.png"], ["{tmp}/absent"]),
    ("predict", ["{tmp}/absent.jpg", "--model-path", "{tmp}/ckpt", "--out", "{tmp}/pred"],
     ["no such image file or folder: {tmp}/absent.jpg"]),
    ("run", ["--dataset", "{tmp}/absent", "--work-dir", "{tmp}/work", "--config", "shapes"],
     ["{tmp}/absent/annotations/instances_train2017.json: no annotations file"]),
    ("demo", ["--out", "{tmp}/demo", "--set", "train.lrr=1"], ["unknown config key 'train.lrr'", "--set"]),
    ("tune", ["--shards", "{tmp}/absent", "--config", "shapes", "--search", "train.lr=uniform(-1,0.1)"],
     ["--search train.lr=uniform(-1.0, 0.1): config key 'train.lr': -1.0 is out of range (must be > 0)"]),
    ("tune", ["--shards", "{tmp}/absent", "--config", "shapes", "--search", "roi.rois_per_image=choice(32,64)"],
     ["{tmp}/absent", "not preprocessed"]),
    # segm_AP accepted: the sweep gets as far as the shards
    ("tune", ["--shards", "{tmp}/absent", "--config", "shapes", "--search", "train.lr=choice(0.01)", "--metric",
              "segm_AP"], ["{tmp}/absent", "not preprocessed"]),
    ("tune", ["--shards", "{tmp}/absent", "--config", "shapes", "--search", "train.lr=choice(0.01)", "--metric",
              "segm_AP", "--set", "train.val_ap_images=-1"], ["config key 'train.val_ap_images': -1 is out of range"]),
])
def test_every_command_ends_a_users_error_in_a_short_message(command, args, words, tmp_path):
    """Each command, with input that is wrong (a missing path, a bad setting), fails before any Ray work with a few
    lines naming the file or option (and saying --verbose shows the traceback), status 2, no traceback."""
    fill = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, [command, *fill])
    _short_error(result, *(w.replace("{tmp}", str(tmp_path)) for w in words), "--verbose shows the traceback")


def test_verbose_keeps_the_traceback_of_a_users_error(tmp_path):
    result = runner.invoke(app, ["train", "--shards", str(tmp_path / "absent"), "--config", "shapes", "--verbose"])
    assert result.exit_code == 1 and isinstance(result.exception, FileNotFoundError), result.output


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """An exception that is not a user's error (here a KeyError from inside the stage) is not turned into a message."""
    from pipelines.evaluation import predict

    def broken(*args, **kwargs):
        raise KeyError("a bug of ours")

    monkeypatch.setattr(predict, "predict_images", broken)
    result = runner.invoke(app, ["predict", str(tmp_path), "--model-path", "m", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError), result.output


def test_a_stages_error_raised_in_a_ray_task_is_mapped_by_its_cause():
    """`run` runs its stages as Ray tasks: the user's error arrives wrapped in Ray's RayTaskError (a subclass of its
    cause's class); the message is the cause's, without the remote traceback."""
    from ray.exceptions import RayTaskError

    from cli import run
    from pipelines.cli_options import user_error
    from pipelines.data.errors import MissingInputError

    command = next(c for c in app.registered_commands if c.callback is run)
    click_command = typer.main.get_command_from_info(command, pretty_exceptions_short=True,
                                                     rich_markup_mode=None)
    wrapped = RayTaskError("stage", "Traceback (most recent call last): ...", MissingInputError("x.json: not there"))
    lines = user_error(wrapped.as_instanceof_cause(), click_command)
    assert lines == "Error: x.json: not there\n(--verbose shows the traceback)"
    assert user_error(RuntimeError("a bug"), click_command) is None


def test_the_console_gets_a_short_message_and_no_traceback(tmp_path):
    """The real console script (a subprocess, as a user runs it): `train --shards` on a folder without a manifest."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cli", "train", "--shards", str(tmp_path), "--config", "shapes"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__)
                                                                           .resolve().parents[2])})
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and str(tmp_path) in " ".join(out.stderr.replace("│", " ").split())
    assert len(out.stderr.strip().splitlines()) <= 15, out.stderr
