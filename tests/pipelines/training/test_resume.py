"""What `train` decides without training (pipelines/training/train.py): which checkpoint is the best, and whether
`--resume` may continue from one. Pure: test_train.py (slow, Ray) runs them inside whole trainings."""

from mrcnn.config import shapes
from pipelines.training.train import lowest_val_loss, resume_refusal


def _config():
    return shapes().override(["train.steps=8", "train.lr=0.01"])


def test_the_best_checkpoint_is_the_one_of_the_lowest_validation_loss():
    # in Ray's order (oldest first); the lowest is neither the first nor the last
    pairs = [("a", {"val_loss": 2.0}), ("b", {"val_loss": 0.5}), ("c", {"val_loss": 1.0}), ("d", {"val_loss": 3.0})]
    assert lowest_val_loss(pairs) == "b"
    # a checkpoint saved before any validation, or with a non-finite loss, ranks last
    assert lowest_val_loss([("early", {}), ("nan", {"val_loss": float("nan")}), ("x", {"val_loss": 9.0})]) == "x"
    assert lowest_val_loss([("nan", {"val_loss": float("nan")}), ("y", {"val_loss": 9.0})]) == "y"
    # ties: the earliest; nothing validated at all: the first
    assert lowest_val_loss([("p", {"val_loss": 1.0}), ("q", {"val_loss": 1.0})]) == "p"
    assert lowest_val_loss([("first", {}), ("second", {})]) == "first"


def test_resume_takes_a_checkpoint_written_before_newer_settings_existed():
    """A checkpoint's config from before a setting existed lacks it; read through the typed config it has the default,
    so the run it belongs to still resumes (and another config is still refused)."""
    config = _config()
    old = config.to_dict()
    for section, name in (("backbone", "frozen_bn_eps"), ("rpn", "anchor_offset"), ("rpn", "round_anchors"),
                          ("rpn", "nms_per_level"), ("roi", "aligned"), ("detection", "min_size")):
        del old[section][name]
    meta = {"config": old, "fingerprint": "f"}
    assert resume_refusal(meta, config, "f") is None
    assert "roi.aligned: True != False" in resume_refusal(meta, config.override(["roi.aligned=false"]), "f")
    assert resume_refusal({"fingerprint": "f"}, config, "f") == "its meta.json holds no config"


def test_resume_refusal_gives_each_reason_and_the_first_three_differences():
    config = _config()
    meta = {"config": config.to_dict(), "fingerprint": "f"}
    assert resume_refusal(meta, config, "f") is None
    assert resume_refusal(meta, config, "g") == "made from other shards (fingerprint 'f', these are 'g')"
    assert resume_refusal({"config": {}, "fingerprint": "f"}, config, "f") == "its meta.json holds no config"
    broken = {**meta, "config": {**meta["config"], "train": {**meta["config"]["train"], "lr": -1.0}}}
    assert resume_refusal(broken, config, "f").startswith("its config does not load: config key 'train.lr'")
    three = config.override(["train.lr=0.5", "train.momentum=0.5", "train.weight_decay=0.5"])
    assert resume_refusal(meta, three, "f") == (
        "trained with another config: train.lr: 0.01 != 0.5; train.momentum: 0.9 != 0.5; "
        "train.weight_decay: 0.0001 != 0.5")
    four = three.override(["train.grad_clip=2.5"])
    assert resume_refusal(meta, four, "f") == (  # sorted by key: grad_clip first, weight_decay left out
        "trained with another config: train.grad_clip: 5.0 != 2.5; train.lr: 0.01 != 0.5; "
        "train.momentum: 0.9 != 0.5 (and 1 more)")
