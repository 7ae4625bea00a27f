"""`mrcnn-cli tune --search`: the search specs, parsed and checked against the config before Ray starts.

A spec is `section.field=kind(args)`:

- `choice(a, b, ...)`: one of the values, drawn at random (`tune.choice`);
- `grid(a, b, ...)`: every value, each once per sample (`tune.grid_search`);
- `uniform(lo, hi)`: a float in [lo, hi) (`tune.uniform`);
- `loguniform(lo, hi)`: a float in [lo, hi) uniform in log space, 0 < lo (`tune.loguniform`);
- `randint(lo, hi)`: an integer in [lo, hi), hi excluded as in Python and Ray (`tune.randint`).

Every key is a config field (`mrcnn.settings.declared`); every value a trial can be given is checked against that
field's type, choices and range, and against the settings it must agree with, by building the config with it
(`Config.from_dict`, the same checks `--set` goes through): the listed values of `choice` / `grid`, the two bounds
of `uniform` / `loguniform`, lo and hi - 1 of `randint`. A range's values between two good bounds are good (the
declared ranges are intervals). Bad specs raise `SearchSpecError` naming the spec and what is wrong.

Light: Ray is imported by `to_tune` only.
"""

from __future__ import annotations

import ast
import re
import typing
from dataclasses import dataclass
from typing import Any

from mrcnn.config import Config, ConfigError
from mrcnn.settings import declared
from pipelines.data.errors import InputError

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
_SPEC = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*([a-z]+)\s*\((.*)\)\s*$")


class SearchSpecError(InputError):
    """A `--search` spec that cannot be used; the message names the spec."""


@dataclass(frozen=True)
class SearchSpec:
    """One searched setting: `key` ("section.field"), `kind` (one of KINDS) and its arguments (the values of
    choice / grid, (lo, hi) of the ranges), as the config's types hold them."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def __str__(self) -> str:
        return f"{self.key}={self.kind}({', '.join(map(repr, self.args))})"

    def candidates(self) -> tuple[Any, ...]:
        """The values checked against the field: every listed value, or a range's extreme values."""
        if self.kind in ("choice", "grid"):
            return self.args
        lo, hi = self.args
        return (lo, hi - 1) if self.kind == "randint" else (lo, hi)

    def to_tune(self) -> Any:
        """The Ray Tune space (or grid) of this spec."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        return getattr(tune, self.kind)(*self.args)


def parse_value(text: str) -> Any:
    """A spec's argument: a Python / YAML literal (`1e-4`, `64`, `'sgd'`, `true`), else the bare word (`sgd`)."""
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_spec(text: str) -> SearchSpec:
    """`train.lr=loguniform(1e-4, 1e-2)` -> SearchSpec("train.lr", "loguniform", (0.0001, 0.01)); the syntax and
    the argument count only (`check_spec` checks it against the config)."""
    match = _SPEC.match(text)
    if not match:
        raise SearchSpecError(f"--search {text!r}: expected section.field=kind(args), kind one of "
                              f"{', '.join(KINDS)}, e.g. train.lr=loguniform(1e-4,1e-2)")
    key, kind, body = match.groups()
    if kind not in KINDS:
        raise SearchSpecError(f"--search {text!r}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
    args = tuple(parse_value(a) for a in body.split(",")) if body.strip() else ()
    if kind in ("choice", "grid"):
        if not args:
            raise SearchSpecError(f"--search {text!r}: {kind} needs at least one value")
        return SearchSpec(key, kind, args)
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise SearchSpecError(f"--search {text!r}: {kind} takes two numbers, (lo, hi)")
    lo, hi = args
    if not lo < hi:
        raise SearchSpecError(f"--search {text!r}: lo {lo} must be below hi {hi}")
    if kind == "loguniform" and lo <= 0:
        raise SearchSpecError(f"--search {text!r}: loguniform needs lo above 0")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise SearchSpecError(f"--search {text!r}: randint takes two integers")
    if kind != "randint":
        args = (float(lo), float(hi))
    return SearchSpec(key, kind, args)


def field_types() -> dict[str, Any]:
    """{"section.field": its type} of every setting."""
    return {key: hint for key, _, hint in declared(Config)}


def check_spec(spec: SearchSpec, config: Config) -> None:
    """SearchSpecError naming the spec when its key is no setting, its kind does not fit the setting's type, or a
    value a trial could get is refused by the config (type, choices, range, the settings it must agree with)."""
    hint = field_types().get(spec.key)
    if hint is None:
        raise SearchSpecError(f"--search {spec}: unknown config key {spec.key!r}")
    if typing.get_origin(hint) is tuple:
        raise SearchSpecError(f"--search {spec}: {spec.key} holds a list of values; searching lists is not supported")
    if spec.kind in ("uniform", "loguniform") and hint is not float:
        raise SearchSpecError(f"--search {spec}: {spec.kind} draws floats and {spec.key} is not a float setting")
    if spec.kind == "randint" and hint is not int:
        raise SearchSpecError(f"--search {spec}: randint draws integers and {spec.key} is not an integer setting")
    for value in spec.candidates():
        try:
            with_value(config, {spec.key: value})
        except ConfigError as exc:
            raise SearchSpecError(f"--search {spec}: {exc}") from None


def parse_searches(texts: list[str] | tuple[str, ...], config: Config) -> dict[str, SearchSpec]:
    """{key: spec} of the `--search` options, each parsed and checked (`check_spec`); a key searched twice is
    refused."""
    if not texts:
        raise SearchSpecError("--search: give at least one, e.g. --search 'train.lr=loguniform(1e-4,1e-2)'")
    specs: dict[str, SearchSpec] = {}
    for text in texts:
        spec = parse_spec(text)
        if spec.key in specs:
            raise SearchSpecError(f"--search {text!r}: {spec.key} is searched twice")
        check_spec(spec, config)
        specs[spec.key] = spec
    return specs


def with_value(config: Config, values: dict[str, Any]) -> Config:
    """`config` with {"section.field": value} applied and every check of the config run (ConfigError naming the
    key otherwise); float settings take ints (`choice(1, 2)` for a float)."""
    data = config.to_dict()
    for key, value in values.items():
        section, name = key.split(".")
        data[section][name] = value
    return Config.from_dict(data)


def trial_config(config: Config, sampled: dict[str, Any]) -> Config:
    """The trial's config: the base config with the values Tune sampled for it (`{"train.lr": 0.003}`)."""
    return with_value(config, {k: _plain(v) for k, v in sampled.items()})


def _plain(value: Any) -> Any:
    """numpy scalars (what Tune samples) as Python numbers."""
    return value.item() if hasattr(value, "item") else value


__all__ = ["KINDS", "SearchSpec", "SearchSpecError", "check_spec", "parse_searches", "parse_spec", "parse_value",
           "trial_config", "with_value"]
