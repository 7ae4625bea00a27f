"""The one typed configuration of mrcnn-pipeline: where callers import it from.

`mrcnn.schema` declares the sections and `Config` (each setting once, with its range or choices and whether it changes
shards), `mrcnn.settings` derives validation, the flat view and the shard fields from those declarations,
`mrcnn.presets` holds the named configurations; `load_config` is `--config PRESET_OR_FILE` plus `--set` overrides.
Every other module of `mrcnn/` takes plain arguments or a typed settings object built by the `from_config` beside
its class; only those, `build_model` and the pipeline stages read a `Config`.
"""

from __future__ import annotations

from pathlib import Path

from mrcnn.presets import OWN_PRESETS, PRESETS, coco, shapes, torchvision_maskrcnn
from mrcnn.schema import (
    LEGACY_SHARD_FIELDS,
    Amp,
    BackboneConfig,
    Config,
    DetectionConfig,
    EvalConfig,
    GradCompression,
    ImageConfig,
    ImageEncoding,
    Layers,
    MaskConfig,
    Optimizer,
    PreprocessConfig,
    RoIConfig,
    RPNConfig,
    Schedule,
    TrainConfig,
    check_flip,
    fingerprint_diff,
)
from mrcnn.settings import ConfigError, choices

__all__ = [
    "LEGACY_SHARD_FIELDS", "OWN_PRESETS", "PRESETS", "Amp", "BackboneConfig", "Config", "ConfigError",
    "DetectionConfig", "EvalConfig", "GradCompression", "ImageConfig", "ImageEncoding", "Layers", "MaskConfig",
    "Optimizer", "PreprocessConfig", "RPNConfig", "RoIConfig", "Schedule", "TrainConfig", "check_flip", "choices",
    "coco", "fingerprint_diff", "load_config", "shapes", "torchvision_maskrcnn",
]


def load_config(preset_or_file: str = "coco", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """`--config PRESET_OR_FILE` plus repeatable `--set section.field=value`."""
    if preset_or_file in PRESETS:
        config = PRESETS[preset_or_file]()
    else:
        path = Path(preset_or_file)
        if not path.is_file():
            others = ", ".join(p for p in PRESETS if p not in OWN_PRESETS)
            raise ConfigError(f"--config {preset_or_file!r}: neither a preset ({', '.join(OWN_PRESETS)}) nor a file, "
                              f"nor a preset of pretrained weights ({others})")
        config = Config.load(path)
    return config.override(list(overrides)) if overrides else config
