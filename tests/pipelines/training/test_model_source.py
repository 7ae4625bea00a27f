"""`ModelSource`: one parser for every way a model is named, and the short error for a source that is not a model."""

from __future__ import annotations

import os

import pytest
import torch

from mrcnn.config import shapes
from mrcnn.torchvision_weights import WeightsFormatError
from pipelines.data.categories import CategoryMap
from pipelines.data.errors import InputError
from pipelines.models import model_spec
from pipelines.training.model_source import ModelSource, ModelSourceError, check_init

SHAPES = CategoryMap((1, 2, 3), ("square", "circle", "triangle"))


def test_every_form_of_a_model_source_parses_to_its_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ModelSource.parse("ckpt/checkpoint_000004") == ModelSource("checkpoint",
                                                                      f"{tmp_path}/ckpt/checkpoint_000004")
    uri = "s3://bucket/run/checkpoint_000004?endpoint_override=h:9&scheme=http"
    assert ModelSource.parse(uri) == ModelSource("checkpoint", uri)
    assert ModelSource.parse(f"file://{tmp_path}/c") == ModelSource("checkpoint", f"file://{tmp_path}/c")
    for text in ("runs:/0123abcd/model", "models:/mrcnn/3", "models:/mrcnn@prod", "mlflow-artifacts:/1/2/model"):
        assert ModelSource.parse(text) == ModelSource("mlflow", text)
    assert ModelSource.parse("torchvision:w.pth") == ModelSource("torchvision", f"{tmp_path}/w.pth")
    assert str(ModelSource.parse("torchvision:w.pth")) == f"torchvision:{tmp_path}/w.pth"
    assert ModelSource.parse("torchvision:s3://b/w.pth").location == "s3://b/w.pth"
    for text in ("torchvision:", "models:/", "runs:", ""):
        with pytest.raises(ModelSourceError, match="a model is a checkpoint folder"):
            ModelSource.parse(text)


@pytest.mark.parametrize("what", ["folder", "file"])
def test_a_source_that_is_not_a_model_is_a_short_error_naming_it(tmp_path, what):
    path = tmp_path / "holiday"
    if what == "folder":
        path.mkdir()
        (path / "photo.jpg").write_bytes(b"\xff\xd8")
    else:
        path.write_text("not a model")
    for attempt in (lambda: model_spec(str(path)),
                    lambda: check_init(ModelSource.parse(str(path)), config=shapes(), categories=SHAPES,
                                       num_classes=4)):
        with pytest.raises(ModelSourceError) as e:
            attempt()
        assert isinstance(e.value, InputError)
        message = str(e.value)
        assert message.startswith(f"{path}: not a checkpoint"), message
        assert "runs:/RUN_ID/PATH, models:/NAME/VERSION" in message and "\n" not in message


def test_a_torchvision_source_that_is_not_weights_names_the_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not weights")
    with pytest.raises(WeightsFormatError, match=f"cannot read torchvision weights from {path}: not a state dict"):
        check_init(ModelSource.parse(f"torchvision:{path}"), config=shapes(), categories=SHAPES, num_classes=4)
    torch.save({"a": torch.zeros(1)}, tmp_path / "tiny.pth")
    with pytest.raises(WeightsFormatError, match=str(tmp_path / "tiny.pth")):
        check_init(ModelSource.parse(f"torchvision:{tmp_path / 'tiny.pth'}"), config=shapes(), categories=SHAPES,
                   num_classes=4)
    assert not os.path.exists(tmp_path / "ckpt")


def test_backbone_weights_that_are_missing_or_not_weights_are_refused_before_training(tmp_path):
    from mrcnn.backbone import BackboneWeightsError

    missing, text = tmp_path / "absent.pth", tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(BackboneWeightsError, match=f"backbone weights file not found: {missing}"):
        check_init(None, config=shapes(), categories=SHAPES, num_classes=4, backbone_weights=str(missing))
    with pytest.raises(BackboneWeightsError, match=f"cannot read backbone weights from {text}: not a state dict"):
        check_init(None, config=shapes(), categories=SHAPES, num_classes=4, backbone_weights=str(text))
