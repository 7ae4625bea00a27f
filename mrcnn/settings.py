"""How a config setting is declared, and what is derived from the declarations.

A setting is a field of a frozen section dataclass (`mrcnn.schema`) declared once with `setting(default, range=...,
shard=..., legacy=...)`: its allowed values are its `Literal[...]` type's choices or its `Range`; `shard=True` marks
a field that changes preprocessed shard content (the fingerprint covers it); `legacy` is the value every shard
written before the field existed has. From those declarations come, and are written nowhere else:

- `validate_fields`: every choice and range, ConfigError naming the key and what is allowed;
- `flat`: {"section.field": value} of every setting, for MLflow params and config comparisons;
- `shard_fields` / `legacy_shard_fields`: what the fingerprint covers, and the values of shard fields added later;
- `build`: a section (or the whole config) from a plain mapping (YAML, `--set` overrides), every value type-checked.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

_RANGE, _SHARD, _LEGACY = "range", "shard", "legacy"
_NO_LEGACY = object()


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric setting (each element, for tuples); None: unbounded on that side."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        lo, hi = self.lo, self.hi
        return (lo is None or (v > lo if self.lo_open else v >= lo)) and (hi is None or (v < hi if self.hi_open
                                                                                          else v <= hi))

    def __str__(self) -> str:
        """The wording of ConfigError: '>= 1', '> 0', 'in (0, 1]', 'any number'."""
        if self.lo is None and self.hi is None:
            return "any number"
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


def between(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Range:
    """e.g. between(0, 1, lo_open=True): (0, 1]."""
    return Range(lo, hi, lo_open, hi_open)


ANY = Range()  # declared on purpose: any number (a seed, a pixel mean)
POSITIVE = between(0, lo_open=True)
AT_LEAST_1 = between(1)
AT_LEAST_0 = between(0)
FRACTION = between(0, 1)  # [0, 1]
OPEN_FRACTION = between(0, 1, lo_open=True)  # (0, 1]


def setting(default: Any, *, range: Range | None = None, shard: bool = False, legacy: Any = _NO_LEGACY) -> Any:  # noqa: A002
    """A config field: its default, its `range` (numeric settings; a `Literal` one takes its choices from its type),
    whether it changes shard content (`shard`) and, for a shard field added after shards were first written, the
    `legacy` value those shards have (a manifest or checkpoint config without the field is read as having it)."""
    metadata: dict[str, Any] = {_RANGE: range, _SHARD: shard}
    if legacy is not _NO_LEGACY:
        if not shard:
            raise TypeError("only a shard field has a legacy value")
        metadata[_LEGACY] = legacy
    return field(default=default, metadata=metadata)


def choices(hint: Any) -> tuple | None:
    """The allowed values of a `Literal[...]` setting (None for any other type)."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def is_numeric(hint: Any) -> bool:
    """int / float, or a tuple of them: the settings that must declare a range."""
    if typing.get_origin(hint) is tuple:
        return all(a is Ellipsis or is_numeric(a) for a in typing.get_args(hint))
    return hint in (int, float)


def section_types(config_cls: type) -> dict[str, type]:
    """{section name: section dataclass} of the top-level config class, in declaration order."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in fields(config_cls) if dataclasses.is_dataclass(hints[f.name])}


def declared(config_cls: type) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(key "section.field", the field, its type) of every setting, in declaration order."""
    for section, cls in section_types(config_cls).items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            yield f"{section}.{f.name}", f, hints[f.name]


def check_choice(key: str, hint: Any, value: Any) -> None:
    allowed = choices(hint)
    # True == 1 in Python: a bool is no choice of an int setting, nor is 1 of a str one
    if allowed is not None and not any(value == a and type(value) is type(a) for a in allowed):
        raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def validate_fields(config: Any) -> None:
    """Every setting's choices and range; ConfigError naming the key and what is allowed. TypeError for a numeric
    setting declared without a range (every one declares its range, `ANY` included)."""
    for key, f, hint in declared(type(config)):
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        check_choice(key, hint, value)
        if not is_numeric(hint):
            continue
        allowed = f.metadata.get(_RANGE)
        if allowed is None:
            raise TypeError(f"config setting {key!r} declares no range: declare it with setting(..., range=...)")
        for item in value if isinstance(value, tuple) else (value,):
            if not isinstance(item, (int, float)) or isinstance(item, bool) or item not in allowed:
                raise ConfigError(f"config key {key!r}: {value!r} is out of range (must be {allowed})")


def plain(value: Any) -> Any:
    """Tuples as lists, recursively: the YAML / JSON / MLflow form of a value."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def flat(config: Any) -> dict[str, Any]:
    """{"name": ..., "section.field": value, ...} of every setting (tuples as lists), in declaration order: the MLflow
    params of a run and the form configs are compared in."""
    out = {f.name: plain(getattr(config, f.name)) for f in fields(config) if f.name not in section_types(type(config))}
    for key, _, _ in declared(type(config)):
        section, name = key.split(".")
        out[key] = plain(getattr(getattr(config, section), name))
    return out


def shard_fields(config: Any) -> dict[str, Any]:
    """{"section.field": value} of every field declared `shard=True` (tuples as lists)."""
    values = flat(config)
    return {key: values[key] for key, f, _ in declared(type(config)) if f.metadata.get(_SHARD)}


def legacy_shard_fields(config_cls: type) -> dict[str, Any]:
    """{"section.field": legacy value} of the shard fields declared with one."""
    return {key: f.metadata[_LEGACY] for key, f, _ in declared(config_cls) if _LEGACY in f.metadata}


# --------------------------------------------------------------------- from plain data
def build(cls: type, data: Any, prefix: str = "") -> Any:
    """An instance of dataclass `cls` from a plain mapping: defaults for missing keys, every value type-checked,
    ConfigError naming an unknown key or a value of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'!r}: expected a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r} (known: {', '.join(sorted(known))})")
    kwargs = {f.name: _coerce(hints[f.name], data[f.name], prefix + f.name) for f in fields(cls) if f.name in data}
    return replace(cls(), **kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, prefix=key + ".")
    origin = typing.get_origin(hint)
    if origin is Literal:
        check_choice(key, hint, value)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) > 1 and args[1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"config key {key!r}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(args[0], v, key) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    return value
