"""Training checkpoints: what one holds, how it is written and read back safely.

A checkpoint is a directory:
    state.pt    torch.save of plain containers and tensors only (model, optimizer, scheduler, fp16 GradScaler,
                and the random states of every rank: CPU and each CUDA device),
                so that it loads with `torch.load(..., weights_only=True)`
    meta.json   step, epoch, config, category map, shard fingerprint, validation loss
Written by rank 0 into a temporary directory and handed to `ray.train.report(checkpoint=...)`, which
persists it to `RunConfig.storage_path` (local or s3://).

Reading (`load_checkpoint`, `read_meta`, `find_latest_checkpoint`) takes a local path or a URI (`file://`,
`s3://`, `gs://`, ...) through pyarrow filesystems: on a cluster a checkpoint lives where every node can read it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from pyarrow import fs as pafs
from torch import nn

from pipelines.data.errors import InputError
from pipelines.infra.storage import filesystem_for, join_uri, read_file

STATE_FILE = "state.pt"


META_FILE = "meta.json"


class CheckpointError(InputError):
    """A checkpoint that is missing, unreadable or does not fit what it is loaded into."""


@dataclass
class TrainingState:
    step: int
    epoch: int
    batch_in_epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    rng: torch.Tensor | None  # rank 0's CPU generator (what checkpoints before per-rank states held)
    meta: dict[str, Any]
    rng_by_rank: list[dict[str, Any]] | None = None  # `rng_state()` of each rank, in rank order
    scaler: dict[str, Any] | None = None  # the fp16 GradScaler's state_dict (loss scale, growth tracker)


def rng_state() -> dict[str, Any]:
    """This process's random state: the CPU generator and, where CUDA has been used, every CUDA device's
    (the RPN and RoI samplers draw on the training device)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": list(cuda)}


def set_rng_state(state: dict[str, Any] | torch.Tensor) -> None:
    """Restore `rng_state()` (or a bare CPU state, as older checkpoints hold). CUDA states are restored where
    this process has as many CUDA devices as were saved; a checkpoint saved on CUDA still loads on a CPU."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


def rank_rng_state(state: TrainingState, rank: int) -> dict[str, Any] | torch.Tensor | None:
    """The random state rank `rank` resumes with: its own where the checkpoint has one, else (another world size,
    or an older checkpoint) rank 0's."""
    if state.rng_by_rank:
        return state.rng_by_rank[rank if rank < len(state.rng_by_rank) else 0]
    return state.rng


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
    scaler: torch.amp.GradScaler | None = None,
    rng_by_rank: list[dict[str, Any]] | None = None,
) -> Path:
    """rng_by_rank: every rank's `rng_state()` (gathered by the caller), None: this process's alone."""
    directory = Path(directory)
    rng_by_rank = rng_by_rank if rng_by_rank is not None else [rng_state()]
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": _scheduler_state(scheduler),
        "rng": rng_by_rank[0]["cpu"],
        "rng_by_rank": rng_by_rank,
        "scaler": scaler.state_dict() if scaler is not None else None,
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


def load_checkpoint(location: str | Path, *, map_location: str | torch.device = "cpu") -> TrainingState:
    """A checkpoint directory given as a local path or a URI (`file:///shared/ckpt/...`, `s3://bucket/...`)."""
    filesystem, root = _open(location)
    state_path, meta_path = f"{root}/{STATE_FILE}", f"{root}/{META_FILE}"
    if not _is_file(filesystem, state_path, location) or not _is_file(filesystem, meta_path, location):
        raise CheckpointError(f"{location}: not a checkpoint (needs {STATE_FILE} and {META_FILE})")
    # read whole, then unpickled from memory: the same code for every filesystem, and one request per file on
    # object stores (torch's zip reader over a remote random-access file would make many small ranged reads)
    data = _read(filesystem, state_path, location)
    try:
        # weights_only: a checkpoint is data, never code
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"{join_uri(os.fspath(location), STATE_FILE)}: cannot be loaded safely: {exc}") from exc
    del data
    meta = _parse_meta(_read(filesystem, meta_path, location), location)
    return TrainingState(
        step=int(state["step"]),
        epoch=int(state["epoch"]),
        batch_in_epoch=int(state.get("batch_in_epoch", 0)),
        model=state["model"],
        optimizer=state.get("optimizer"),
        scheduler=state.get("scheduler"),
        rng=state.get("rng"),
        meta=meta,
        rng_by_rank=state.get("rng_by_rank"),
        scaler=state.get("scaler"),
    )


def read_meta(location: str | Path) -> dict[str, Any]:
    """The meta.json of a checkpoint directory (local path or URI), without loading the weights."""
    filesystem, root = _open(location)
    path = f"{root}/{META_FILE}"
    if not _is_file(filesystem, path, location):
        raise CheckpointError(f"{location}: not a checkpoint (no {META_FILE})")
    return _parse_meta(_read(filesystem, path, location), location)


def find_latest_checkpoint(storage: str | Path, run_name: str | None = None, *,
                           accept: Callable[[dict[str, Any]], str | None] | None = None,
                           refused: list[str] | None = None) -> str | None:
    """The checkpoint with the highest step (tie: the newest meta.json) in any `checkpoint_*` directory under
    `storage` (or `storage/run_name`), as a path when `storage` is a path and a URI when it is a URI; None if
    there is none. A directory without its state file (an upload cut short) is not a checkpoint.

    accept: `accept(meta)` is None for a checkpoint that may be taken, else the reason it may not; the refused
    ones are appended to `refused` as "LOCATION: reason"."""
    filesystem, root = _open(storage)
    if run_name:  # joined inside the filesystem: a URI's query (s3 options) stays at its end
        root = f"{root.rstrip('/')}/{run_name}"
    location = join_uri(os.fspath(storage), run_name) if run_name else os.fspath(storage)  # for messages
    try:
        if filesystem.get_file_info(root).type != pafs.FileType.Directory:
            return None
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise CheckpointError(f"{location}: cannot list checkpoints: {exc}") from exc
    files = {info.path: info for info in infos if info.type == pafs.FileType.File}
    best: tuple[int, int] | None = None
    found = None
    for path, info in files.items():
        directory, _, name = path.rpartition("/")
        if name != META_FILE or not directory.rpartition("/")[2].startswith("checkpoint_"):
            continue
        if directory == root.rstrip("/") or f"{directory}/{STATE_FILE}" not in files:
            continue
        meta = _parse_meta(_read(filesystem, path, location), location)
        reason = accept(meta) if accept is not None else None
        if reason is not None:
            if refused is not None:
                refused.append(f"{uri_for(storage, directory)}: {reason}")
            continue
        key = (int(meta.get("step", -1)), info.mtime_ns or 0)
        if best is None or key > best:
            best, found = key, directory
    return None if found is None else uri_for(storage, found)


def uri_for(location: str | Path, path: str) -> str:
    """`path`, a path inside the filesystem of `location`, as `location` is written: a local path stays a path,
    a URI keeps its scheme, its host where the filesystem's paths leave it out (file://, hdfs://) and its query
    (s3 options such as endpoint_override)."""
    location = os.fspath(location)
    if "://" not in location:
        return path
    parts = urlsplit(location)
    # object stores put the bucket in the path (bucket/key); filesystems with a host give an absolute path
    head = f"{parts.scheme}://{parts.netloc}" if path.startswith("/") else f"{parts.scheme}://"
    return head + path + (f"?{parts.query}" if parts.query else "")


def _open(location: str | Path) -> tuple[pafs.FileSystem, str]:
    try:
        filesystem, root = filesystem_for(os.fspath(location))
    except (OSError, ValueError, NotImplementedError) as exc:  # unknown scheme, bad URI, no credentials
        raise CheckpointError(f"{location}: cannot open: {exc}") from exc
    return filesystem, root.rstrip("/") or "/"


def _is_file(filesystem: pafs.FileSystem, path: str, location: str | Path) -> bool:
    try:
        return filesystem.get_file_info(path).type == pafs.FileType.File
    except OSError as exc:
        raise CheckpointError(f"{location}: cannot read: {exc}") from exc


def _read(filesystem: pafs.FileSystem, path: str, location: str | Path) -> bytes:
    try:
        return read_file(filesystem, path)
    except OSError as exc:
        raise CheckpointError(f"{location}: cannot read {path.rpartition('/')[2]}: {exc}") from exc


def _parse_meta(data: bytes, location: str | Path) -> dict[str, Any]:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise CheckpointError(f"{join_uri(os.fspath(location), META_FILE)}: not valid JSON: {exc}") from exc


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
