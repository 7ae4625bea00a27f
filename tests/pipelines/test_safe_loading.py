"""Every loader we control refuses a weights file that carries code: the planted object's unpickling has an
observable side effect (it creates a file), it is saved the way torch saves, and no loader lets it run.

The control test proves the plant works: a plain `torch.load(weights_only=False)` does create the file, so a
loader that unpickled it would be caught. MLflow model URIs (`runs:/`, `models:/`) are unpickled by MLflow
itself (its PyTorch flavour stores the pickled module), which we do not control: load only models you trust.
"""

from __future__ import annotations

import pytest
import torch

from mrcnn.backbone import BackboneWeightsError
from mrcnn.config import shapes
from mrcnn.model import build_model
from pipelines.models import load_model, model_spec
from pipelines.training.checkpoints import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from pipelines.training.pretrained import load_backbone_file


class Planted:
    """Unpickling this calls `open(path, "w")`: the file appears if (and only if) the object is unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(path, marker):
    torch.save({"model": {"w": torch.zeros(1), "evil": Planted(marker)}, "step": 1, "epoch": 0}, path)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(shapes(), num_classes=3)


def _checkpoint_with_planted_state(tmp_path, model, marker):
    directory = tmp_path / "run" / "checkpoint_000001"
    config = shapes()
    save_checkpoint(directory, model=model, optimizer=None, scheduler=None, step=1, epoch=0, batch_in_epoch=0,
                    meta={"config": config.to_dict(), "categories": {"categories": []}, "num_classes": 3})
    _plant(directory / "state.pt", marker)
    return directory


def test_the_plant_runs_code_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "ran"
    _plant(tmp_path / "w.pt", marker)
    torch.load(tmp_path / "w.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_checkpoints_refuse_it(tmp_path, model, as_uri):
    marker = tmp_path / "ran"
    directory = _checkpoint_with_planted_state(tmp_path, model, marker)
    location = f"file://{directory}" if as_uri else str(directory)
    with pytest.raises(CheckpointError, match="state.pt: cannot be loaded safely"):
        load_checkpoint(location)
    assert read_meta(location)["num_classes"] == 3  # the meta is plain JSON, read without the weights
    assert not marker.exists()


def test_evaluate_predict_and_inspect_model_loading_refuses_it(tmp_path, model):
    """`pipelines.models.load_model`, the loader behind evaluate, predict and inspect --model-path."""
    marker = tmp_path / "ran"
    directory = _checkpoint_with_planted_state(tmp_path, model, marker)
    spec = model_spec(str(directory))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_model(spec)
    assert not marker.exists()


def test_backbone_weights_refuse_it(tmp_path, model):
    marker = tmp_path / "ran"
    path = tmp_path / "resnet18.pth"
    state = {k: v for k, v in model.backbone.state_dict().items()}
    state["evil"] = Planted(marker)
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError, match="cannot read backbone weights"):
        load_backbone_file(model, str(path))  # what `train --backbone-weights` calls
    assert not marker.exists()
