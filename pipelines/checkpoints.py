"""Training checkpoints: what one holds, how it is written and read back safely.

A checkpoint is a directory:
    state.pt    torch.save of plain containers and tensors only (model, optimizer, scheduler, RNG),
                so that it loads with `torch.load(..., weights_only=True)`
    meta.json   step, epoch, config, category map, shard fingerprint, validation loss
Written by rank 0 into a temporary directory and handed to `ray.train.report(checkpoint=...)`, which
persists it to `RunConfig.storage_path` (local or s3://).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE_FILE = "state.pt"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit what it is loaded into."""


@dataclass
class TrainingState:
    step: int
    epoch: int
    batch_in_epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng: torch.Tensor | None
    meta: dict[str, Any]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP (`module.` prefixes never reach a checkpoint)."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    step: int,
    epoch: int,
    batch_in_epoch: int,
    meta: dict[str, Any],
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": _scheduler_state(scheduler),
        "rng": torch.get_rng_state(),
        "step": int(step),
        "epoch": int(epoch),
        "batch_in_epoch": int(batch_in_epoch),
    }
    # temp name then rename: a reader never sees a half-written state file
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    full_meta = {**meta, "step": int(step), "epoch": int(epoch), "batch_in_epoch": int(batch_in_epoch)}
    tmp_meta = directory / (META_FILE + ".tmp")
    tmp_meta.write_text(json.dumps(full_meta, indent=1, sort_keys=True))
    os.replace(tmp_meta, directory / META_FILE)
    return directory


def load_checkpoint(directory: str | Path, *, map_location: str | torch.device = "cpu") -> TrainingState:
    directory = Path(directory)
    state_path, meta_path = directory / STATE_FILE, directory / META_FILE
    if not state_path.is_file() or not meta_path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint (needs {STATE_FILE} and {META_FILE})")
    try:
        # weights_only: a checkpoint is data, never code (DEVELOPERS.md, Security)
        state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"{state_path}: cannot be loaded safely: {exc}") from exc
    meta = json.loads(meta_path.read_text())
    return TrainingState(
        step=int(state["step"]),
        epoch=int(state["epoch"]),
        batch_in_epoch=int(state.get("batch_in_epoch", 0)),
        model=state["model"],
        optimizer=state.get("optimizer"),
        scheduler=state.get("scheduler"),
        rng=state.get("rng"),
        meta=meta,
    )


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint (no {META_FILE})")
    return json.loads(path.read_text())


def find_latest_checkpoint(storage: str | Path, run_name: str | None = None) -> Path | None:
    """The checkpoint with the highest step under `storage` (or `storage/run_name`), or None."""
    root = Path(storage) / run_name if run_name else Path(storage)
    if not root.is_dir():
        return None
    best: tuple[int, float] | None = None
    found = None
    for meta_path in root.glob("**/checkpoint_*/" + META_FILE):
        step = int(json.loads(meta_path.read_text()).get("step", -1))
        key = (step, meta_path.stat().st_mtime)
        if best is None or key > best:
            best, found = key, meta_path.parent
    return found


def load_model_state(
    model: nn.Module, state: dict[str, torch.Tensor], *, reinit_class_layers: bool = False
) -> list[str]:
    """Load model weights; with `reinit_class_layers`, tensors whose shape differs (class-specific
    layers of a model trained on another number of classes) keep their fresh initialisation.

    Returns the names of the tensors that were re-initialised; any other mismatch is an error.
    """
    own = model.state_dict()
    skipped = []
    filtered = {}
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            if not reinit_class_layers:
                raise CheckpointError(
                    f"checkpoint tensor {key}: shape {tuple(value.shape)} != model {tuple(own[key].shape)}"
                )
            skipped.append(key)
            continue
        filtered[key] = value
    result = model.load_state_dict(filtered, strict=False)
    missing = [k for k in result.missing_keys if k not in skipped]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint does not fit the model: missing {missing}, unexpected {result.unexpected_keys}"
        )
    return skipped


def _scheduler_state(scheduler: Any | None) -> dict[str, Any] | None:
    if scheduler is None:
        return None
    # LambdaLR stores None for each lambda that is a plain function, so its state is plain data
    return scheduler.state_dict()
