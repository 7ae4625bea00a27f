"""Settings declared once: each field's range, choices and shard flag live on the field, and validation, the shard
fields, the legacy values, the flat view and the fingerprint are derived from them; each sub-net reads its settings
through the `from_config` beside its class."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from mrcnn import settings
from mrcnn.config import LEGACY_SHARD_FIELDS, Config, ConfigError, coco, shapes, torchvision_maskrcnn
from mrcnn.model import build_model

# what shards and checkpoints already written carry: a refactor of the config must not move these
PINNED_FINGERPRINTS = {"coco": "48616d31e993477e", "shapes": "74da3fdc819506b1", "torchvision": "f8acc28b37462c51"}
PINNED_SHARD_FIELDS = [
    "image.min_dim", "image.max_dim", "image.resize_mode", "image.encoding", "image.jpeg_quality",
    "rpn.anchor_scales", "rpn.feature_strides", "rpn.anchor_ratios", "rpn.anchor_stride", "rpn.anchor_offset",
    "rpn.round_anchors", "rpn.positive_iou", "rpn.negative_iou", "rpn.crowd_iou", "rpn.bbox_std",
    "mask.mini_mask_size", "roi.max_gt_instances", "preprocess.drop_empty_train",
]


@pytest.mark.parametrize("preset", [coco, shapes, torchvision_maskrcnn])
def test_fingerprints_of_the_presets_are_pinned(preset):
    config = preset()
    assert config.fingerprint() == PINNED_FINGERPRINTS[config.name]


def test_shard_fields_are_the_fields_declared_shard():
    config = coco()
    assert sorted(config.shard_fields()) == sorted(PINNED_SHARD_FIELDS)
    assert config.shard_fields()["rpn.anchor_scales"] == [32, 64, 128, 256, 512]  # lists, as in a manifest
    assert LEGACY_SHARD_FIELDS == {"rpn.anchor_offset": 0.5, "rpn.round_anchors": False}


def test_every_numeric_setting_declares_its_range():
    """A number without a declared range would be accepted whatever its value: every int / float (and tuple of them)
    field says what it allows, `ANY` when that is any number."""
    undeclared = [key for key, f, hint in settings.declared(Config)
                  if settings.is_numeric(hint) and f.metadata.get("range") is None]
    assert undeclared == []
    numeric = [key for key, _, hint in settings.declared(Config) if settings.is_numeric(hint)]
    assert "train.lr" in numeric and "rpn.bbox_std" in numeric and "backbone.depth" not in numeric  # Literal: choices


@dataclass(frozen=True)
class _Ranged:
    share: float = settings.setting(0.5, range=settings.OPEN_FRACTION)


@dataclass(frozen=True)
class _Unranged:
    count: int = 3  # a plain field: no range declared


@dataclass(frozen=True)
class _Top:
    ranged: _Ranged = field(default_factory=_Ranged)


@dataclass(frozen=True)
class _TopWithANewField:
    ranged: _Ranged = field(default_factory=_Ranged)
    added: _Unranged = field(default_factory=_Unranged)


def test_a_numeric_field_added_without_a_range_is_refused():
    settings.validate_fields(_Top())
    with pytest.raises(TypeError, match=r"'added\.count' declares no range"):
        settings.validate_fields(_TopWithANewField())


def test_a_range_declared_on_the_field_is_what_validation_checks():
    with pytest.raises(ConfigError, match=r"'ranged\.share': 0\.0 is out of range \(must be in \(0, 1\]\)"):
        settings.validate_fields(_Top(_Ranged(share=0.0)))


def test_a_legacy_value_belongs_to_a_shard_field():
    with pytest.raises(TypeError, match="shard field"):
        settings.setting(1, range=settings.ANY, legacy=1)


def test_the_flat_view_is_every_section_field_under_its_mlflow_name():
    """`Config.flat()` keeps the MLflow param names runs were logged with: `name` and `section.field`, values as in
    YAML (tuples as lists)."""
    config = shapes()
    expected = {"name": "shapes"}
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            expected.update({f"{section}.{key}": value for key, value in values.items()})
    assert config.flat() == expected
    assert list(config.flat())[:3] == ["name", "image.min_dim", "image.max_dim"]


@pytest.mark.parametrize(
    "override, read, expected",
    [
        ("rpn.nms_threshold=0.55", lambda m: m.proposal_settings.nms_threshold, 0.55),
        ("rpn.post_nms_test=77", lambda m: m.proposal_settings.post_nms_test, 77),
        ("rpn.anchors_per_image=96", lambda m: m.rpn_sample_settings.num_samples, 96),
        ("rpn.head_channels=24", lambda m: m.rpn_head.conv.out_channels, 24),
        ("roi.rois_per_image=40", lambda m: m.target_settings.rois_per_image, 40),
        ("roi.sampling_ratio=3", lambda m: m.pool_settings.sampling_ratio, 3),
        ("roi.fc_dim=48", lambda m: m.box_head.fc2.out_features, 48),
        ("roi.mask_conv_dim=16", lambda m: m.mask_head.predictor.in_channels, 16),
        ("detection.min_confidence=0.25", lambda m: m.detection_settings.min_confidence, 0.25),
        ("backbone.trainable_layers=2", lambda m: any(p.requires_grad for p in m.backbone.layer2.parameters()), False),
    ],
)
def test_a_setting_reaches_its_sub_net_through_from_config(override, read, expected):
    base, changed = build_model(shapes(), 3), build_model(shapes().override([override]), 3)
    assert read(changed) == expected and read(base) != expected


def test_a_range_reads_as_it_is_declared_and_holds_its_ends_as_declared():
    assert [str(r) for r in (settings.Range(), settings.between(0), settings.between(0, lo_open=True),
                             settings.between(hi=5), settings.between(hi=5, hi_open=True),
                             settings.between(0, 1, lo_open=True), settings.between(0, 1, hi_open=True))] == [
        "any number", ">= 0", "> 0", "<= 5", "< 5", "in (0, 1]", "in [0, 1)"]
    assert 5 in settings.between(hi=5) and 5 not in settings.between(hi=5, hi_open=True)
    assert 0 in settings.between(0, 1) and 0 not in settings.between(0, 1, lo_open=True)


@dataclass(frozen=True)
class _Tiny:
    size: int = 3
    pair: tuple[float, float] = (0.0, 1.0)
    one: tuple[int] = (1,)
    mode: Literal["a", "b"] = "a"
    many: tuple[float, ...] = ()
    name: str = "x"


@dataclass(frozen=True)
class _Outer:
    tiny: _Tiny = _Tiny()


def test_build_from_plain_data_and_its_messages():
    with pytest.raises(ConfigError, match="^config section 'tiny': expected a mapping$"):  # a nested section
        settings.build(_Outer, {"tiny": 5})
    with pytest.raises(ConfigError, match="^unknown config key 'tiny.sise' "):
        settings.build(_Outer, {"tiny": {"sise": 4}})
    built = settings.build(_Tiny, {"size": 4, "pair": [2, 3.5], "one": [7], "mode": "b", "many": [1], "name": "y"})
    assert built == _Tiny(4, (2.0, 3.5), (7,), "b", (1.0,), "y")
    assert type(built.pair[0]) is float and type(built.many[0]) is float  # each element coerced to its type
    refusals = [([1], "config section '<root>': expected a mapping"),
                ({"sise": 4}, "unknown config key 'sise' (known: many, mode, name, one, pair, size)"),
                ({"pair": 5}, "config key 'pair': expected a list, got 5"),
                ({"pair": [1.0]}, "config key 'pair': expected 2 values, got 1"),
                ({"mode": "c"}, "config key 'mode': 'c' is not one of 'a', 'b'"),
                ({"size": True}, "config key 'size': expected an integer, got True"),
                ({"one": ["7"]}, "config key 'one': expected an integer, got '7'"),
                ({"many": [1, "x"]}, "config key 'many': expected a number, got 'x'"),
                ({"pair": [True, 1.0]}, "config key 'pair': expected a number, got True"),
                ({"name": 3}, "config key 'name': expected a string, got 3")]
    for data, message in refusals:
        with pytest.raises(ConfigError) as refused:
            settings.build(_Tiny, data)
        assert str(refused.value) == message


def test_a_bool_or_a_string_in_a_numeric_setting_is_out_of_range():
    config = shapes()
    for value in (True, "x"):  # True == 1 is inside [0, 1) as a number: refused as a bool
        with pytest.raises(ConfigError, match=rf"^config key 'train.momentum': {value!r} is out of range"):
            dataclasses.replace(config, train=dataclasses.replace(config.train, momentum=value))
