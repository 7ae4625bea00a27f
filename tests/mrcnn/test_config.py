import pytest

from mrcnn.config import Config, ConfigError, TrainConfig, choices, coco, fingerprint_diff, load_config, shapes


@pytest.mark.parametrize("preset", [coco, shapes])
def test_yaml_round_trip(tmp_path, preset):
    config = preset()
    path = tmp_path / "c.yaml"
    config.save(path)
    assert Config.load(path) == config
    assert load_config(str(path)) == config


def test_coco_preset_is_the_seed_design():
    c = coco()
    assert (c.image.min_dim, c.image.max_dim) == (800, 1024)
    assert c.backbone.depth == 50 and c.backbone.fpn_channels == 256
    assert c.rpn.anchor_scales == (32, 64, 128, 256, 512) and c.rpn.feature_strides == (4, 8, 16, 32, 64)
    assert c.rpn.anchor_ratios == (0.5, 1.0, 2.0) and c.rpn.anchor_stride == 2
    assert (c.rpn.anchors_per_image, c.rpn.pre_nms_topk, c.rpn.nms_threshold) == (256, 6000, 0.7)
    assert (c.rpn.post_nms_train, c.rpn.post_nms_test) == (2000, 1000)
    assert (c.roi.rois_per_image, c.roi.positive_fraction) == (200, 0.33)
    assert (c.mask.mini_mask_size, c.mask.mask_size) == (56, 28)
    assert c.roi.max_gt_instances == 100 and c.detection.max_detections == 100
    assert (c.detection.min_confidence, c.detection.nms_threshold) == (0.7, 0.3)
    t = c.train
    assert (t.lr, t.lr_reference_batch, t.momentum, t.weight_decay, t.grad_clip) == (0.02, 16, 0.9, 1e-4, 5.0)


def test_overrides_apply_and_parse_types():
    c = load_config("shapes", ["train.lr=0.5", "backbone.depth=34", "rpn.anchor_ratios=[1.0]", "train.flip=false"])
    assert c.train.lr == 0.5 and c.backbone.depth == 34 and c.rpn.anchor_ratios == (1.0,) and c.train.flip is False
    assert c.image == shapes().image  # untouched sections stay


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "train.lrr"),
        ("trian.lr=1", "trian"),
        ("train.lr=abc", "train.lr"),
        ("backbone.depth=1.5", "backbone.depth"),
        ("train.flip=3", "train.flip"),
        ("rpn.bbox_std=[1, 2]", "rpn.bbox_std"),
        ("nodot", "section.field=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        shapes().override([override])


def test_unknown_key_in_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nimage:\n  max_dimm: 3\n")
    with pytest.raises(ConfigError, match=r"image\.max_dimm"):
        Config.load(path)


def test_unknown_preset_or_missing_file():
    assert load_config() == coco()  # no --config: the coco preset
    with pytest.raises(ConfigError) as refused:
        load_config("no-such-preset")
    # the way out: every name --config takes, our presets apart from the pretrained weights' ones
    assert str(refused.value) == ("--config 'no-such-preset': neither a preset (coco, shapes) nor a file, nor a preset "
                                  "of pretrained weights (torchvision)")


def test_fingerprint_changes_only_with_shard_fields():
    base = shapes()
    fp = base.fingerprint()
    # training, model-width and evaluation settings do not change shard content
    for o in ["train.lr=0.3", "backbone.depth=50", "roi.fc_dim=512", "detection.min_confidence=0.1", "name=other"]:
        assert base.override([o]).fingerprint() == fp, o
    # geometry, anchors, thresholds, mini-masks and encoding do
    for o in [
        "image.max_dim=256",
        "image.min_dim=100",
        "image.jpeg_quality=90",
        "rpn.anchor_stride=2",
        "rpn.anchor_scales=[4, 8, 16, 32, 64]",
        "rpn.positive_iou=0.6",
        "mask.mini_mask_size=28",
    ]:
        changed = base.override([o])
        assert changed.fingerprint() != fp, o
        assert fingerprint_diff(base.shard_fields(), changed.shard_fields()), o


def test_fingerprint_diff_names_fields():
    a, b = coco().shard_fields(), coco().override(["image.max_dim=512"]).shard_fields()
    assert fingerprint_diff(a, b) == ["image.max_dim: 1024 != 512"]


@pytest.mark.parametrize(
    "override, message",
    [  # the list: each was accepted and failed later inside a Ray worker, or with a ZeroDivisionError
        ("train.optimizer=lamb", r"'train\.optimizer': 'lamb' is not one of 'sgd', 'adamw'"),
        ("train.schedule=foo", r"'train\.schedule': 'foo' is not one of 'step', 'cosine'"),
        ("train.layers=x", r"'train\.layers': 'x' is not one of 'heads', '3\+', '4\+', '5\+', 'all'"),
        ("train.batch_size=0", r"'train\.batch_size': 0 is out of range \(must be >= 1\)"),
        ("train.lr=-1", r"'train\.lr': -1\.0 is out of range \(must be > 0\)"),
        ("image.encoding=gif", r"'image\.encoding': 'gif' is not one of 'jpeg', 'png'"),
        ("backbone.depth=51", r"'backbone\.depth': 51 is not one of 18, 34, 50, 101"),
        ("backbone.depth=true", r"'backbone\.depth'"),
        ("train.grad_compression=int8", r"'train\.grad_compression': 'int8' is not one of 'none', 'fp16'"),
        ("rpn.positive_fraction=1.5", r"'rpn\.positive_fraction': 1\.5 is out of range \(must be in \(0, 1\]\)"),
        ("rpn.bbox_std=[0.1, 0.1, 0, 0.2]", r"'rpn\.bbox_std'.*must be > 0"),
        ("detection.min_confidence=2", r"'detection\.min_confidence'.*in \[0, 1\]"),
        ("train.checkpoint_every=0", r"'train\.checkpoint_every'"),
        ("train.lr_reference_batch=0", r"'train\.lr_reference_batch'"),
        ("train.decay_at=[0.9, 0.5]", r"'train\.decay_at'.*increasing"),
        ("image.max_dim=100", r"'image\.max_dim': 100 is not a multiple of the largest feature stride 64"),
        ("rpn.anchor_scales=[16, 32]", r"'rpn\.anchor_scales': 2 scales for 5 levels"),
        ("rpn.negative_iou=0.6", r"'rpn\.negative_iou': 0\.6 is above rpn\.positive_iou 0\.5"),
        ("train.steps=0", r"'train\.steps' and 'train\.epochs' are both 0"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_built(override, message):
    with pytest.raises(ConfigError, match=message):
        shapes().override([override])


def test_a_config_built_in_code_is_checked_too():
    """Not only YAML and --set: a dataclass built or replaced in code goes through the same checks."""
    from dataclasses import replace

    with pytest.raises(ConfigError, match=r"'train\.optimizer'"):
        replace(shapes(), train=replace(shapes().train, optimizer="lamb"))
    with pytest.raises(ConfigError, match=r"'train\.batch_size'"):
        Config(train=TrainConfig(batch_size=0))


def test_every_choice_setting_lists_what_the_code_accepts():
    """The Literal choices are what the code behind them implements: no choice the trainer would refuse."""
    import typing

    from mrcnn.config import GradCompression, Layers, Optimizer, Schedule
    from pipelines.training.loop import GRAD_COMPRESSIONS
    from pipelines.training.optim import LAYER_CHOICES, OPTIMIZERS

    assert set(typing.get_args(Layers)) == set(LAYER_CHOICES)
    assert typing.get_args(Optimizer) == OPTIMIZERS and typing.get_args(GradCompression) == GRAD_COMPRESSIONS
    assert typing.get_args(Schedule) == ("step", "cosine")
    assert choices(typing.get_type_hints(TrainConfig)["layers"]) == typing.get_args(Layers)


def test_torchvision_preset_sets_each_of_torchvisions_conventions():
    from mrcnn.config import torchvision_maskrcnn

    c = torchvision_maskrcnn()
    assert load_config("torchvision") == c and c.name == "torchvision"
    b = c.backbone
    assert (b.depth, b.fpn_channels, b.frozen_bn, b.frozen_bn_eps) == (50, 256, True, 0.0)
    r = c.rpn
    assert (r.anchor_offset, r.round_anchors, r.anchor_stride, r.anchor_ratios) == (0.0, True, 1, (2.0, 1.0, 0.5))
    assert (r.pre_nms_topk, r.pre_nms_per_level, r.nms_per_level, r.min_size) == (1000, True, True, 1e-3)
    assert r.bbox_std == (1.0, 1.0, 1.0, 1.0) and (r.post_nms_test, r.nms_threshold) == (1000, 0.7)
    assert c.roi.aligned is False and c.roi.sampling_ratio == 2
    d = c.detection
    assert (d.min_confidence, d.nms_threshold, d.max_detections, d.min_size) == (0.05, 0.5, 100, 0.01)
    assert c.train.flip is False
    assert Config.from_dict(c.to_dict()) == c


def test_new_settings_default_to_todays_behaviour():
    """The torchvision conventions are off by default; the two that change the anchors are shard fields."""
    c = coco()
    assert (c.backbone.frozen_bn_eps, c.rpn.anchor_offset, c.rpn.round_anchors) == (1e-5, 0.5, False)
    assert (c.rpn.pre_nms_per_level, c.rpn.nms_per_level, c.rpn.min_size) == (False, False, 1.0)
    assert c.roi.aligned is True and c.detection.min_size == 0.01
    moved = c.override(["rpn.anchor_offset=0.0", "train.flip=false"])
    assert fingerprint_diff(c.shard_fields(), moved.shard_fields()) == ["rpn.anchor_offset: 0.5 != 0.0"]
    rounded = c.override(["rpn.round_anchors=true"])
    assert fingerprint_diff(c.shard_fields(), rounded.shard_fields()) == ["rpn.round_anchors: False != True"]
    # model-only settings do not change the shards
    for o in ["backbone.frozen_bn_eps=0.0", "rpn.pre_nms_per_level=true", "rpn.nms_per_level=true",
              "rpn.min_size=0.001", "roi.aligned=false", "detection.min_size=0.5"]:
        assert c.override([o]).fingerprint() == c.fingerprint(), o


def test_flips_need_centred_anchors():
    from mrcnn.config import check_flip, torchvision_maskrcnn

    check_flip(shapes())
    check_flip(torchvision_maskrcnn())  # its train.flip is off
    with pytest.raises(ConfigError, match=r"'train\.flip': flips need mirror-symmetric anchors, and "
                                          r"rpn\.anchor_offset 0\.0"):
        check_flip(shapes().override(["rpn.anchor_offset=0.0"]))


@pytest.mark.parametrize("override, message", [
    ("rpn.anchor_offset=1.0", r"'rpn\.anchor_offset': 1\.0 is out of range \(must be in \[0, 1\)\)"),
    ("backbone.frozen_bn_eps=-1", r"'backbone\.frozen_bn_eps'"),
])
def test_torchvision_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        coco().override([override])
