"""What `mrcnn-cli serve` is asked to do, checked when it is built (each bad value named by its option): the model
(source, --set / --config, MLflow store), replicas or autoscaling, GPUs, batching, limits and where to listen.

Plain data (it travels to `serve deploy` as the application's args: `to_args` / `from_args`); importable without
Ray or FastAPI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipelines.data.errors import InputError

DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: any camera's photo, not a decompression bomb's billions


class ServeOptionError(InputError):
    """A `serve` option out of its range; the message names the option."""


@dataclass(frozen=True)
class ServeOptions:
    model_path: str
    tracking_uri: str | None = None
    overrides: tuple[str, ...] = ()  # --set
    config_path: str | None = None  # --config (a source without its own config)
    use_gpu: bool = False
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas
    cpus_per_replica: int | None = None  # CPU replicas' CPUs and torch threads; None: sized like evaluate's actors
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_body_bytes: int = 64 << 20
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self):
        checks = [
            ("--replicas", self.replicas >= 1, f"{self.replicas}: at least 1"),
            ("--cpus-per-replica", self.cpus_per_replica is None or self.cpus_per_replica >= 1,
             f"{self.cpus_per_replica}: at least 1"),
            ("--max-batch", self.max_batch >= 1, f"{self.max_batch}: at least 1"),
            ("--batch-wait-ms", self.batch_wait_ms >= 0, f"{self.batch_wait_ms}: at least 0"),
            ("--max-pixels", self.max_pixels >= 1, f"{self.max_pixels}: at least 1"),
            ("--port", 0 < self.port < 65536, f"{self.port}: 1 to 65535"),
        ]
        if self.autoscale is not None:
            low, high = self.autoscale
            checks.append(("--autoscale", 0 <= low <= high and high >= 1, f"{low}:{high}: MIN:MAX with 0 <= MIN <= "
                                                                         f"MAX and MAX >= 1"))
        for option, ok, why in checks:
            if not ok:
                raise ServeOptionError(f"{option} {why}")

    @staticmethod
    def parse_autoscale(text: str | None) -> tuple[int, int] | None:
        """`MIN:MAX` -> (min, max); None stays None."""
        if text is None:
            return None
        low, sep, high = text.partition(":")
        if not (sep and low.strip().isdigit() and high.strip().isdigit()):
            raise ServeOptionError(f"--autoscale {text!r}: MIN:MAX replicas, e.g. 1:4")
        return int(low), int(high)

    def spec(self):
        """The model's ModelSpec, with --set / --config applied (`pipelines.models.model_spec`)."""
        from pipelines.models import model_spec

        return model_spec(self.model_path, tracking_uri=self.tracking_uri, overrides=self.overrides,
                          config_path=self.config_path)

    def to_args(self) -> dict[str, Any]:
        """Plain values (YAML / JSON), the application's args in a Serve config."""
        data = dataclasses.asdict(self)
        data["overrides"] = list(self.overrides)
        data["autoscale"] = list(self.autoscale) if self.autoscale else None
        return data

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ServeOptionError(f"unknown serve args {unknown}; known: {sorted(names)}")
        data = {k: v for k, v in args.items() if k in names}
        data["overrides"] = tuple(data.get("overrides") or ())
        data["autoscale"] = tuple(data["autoscale"]) if data.get("autoscale") else None
        return cls(**data)
