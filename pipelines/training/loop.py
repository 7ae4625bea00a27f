"""The per-worker training loop of `mrcnn-cli train` and its parts.

`train_loop_per_worker` runs in every Ray Train worker: it reads its dataset shard, steps the model and
calls `ray.train.report` every `checkpoint_every` steps and at each epoch end (a barrier, so never every
step). Rank 0 alone writes checkpoints, logs to MLflow and prints progress. The parts (`StepRunner`,
`validation_losses`, `restore`) are plain functions and classes tested without Ray Train.
"""

from __future__ import annotations

import tempfile
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from mrcnn.config import Config, GradCompression
from mrcnn.flip import flip_batch
from mrcnn.model import LOSS_KEYS, build_model
from pipelines.data.categories import CategoryMap
from pipelines.data.loader import densify_rpn_deltas, to_device
from pipelines.infra import tracking
from pipelines.infra.logs import get_logger, setup_logging
from pipelines.training.checkpoints import (
    load_checkpoint,
    load_model_state,
    rank_rng_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap,
)
from pipelines.training.local_sgd import LocalSGD, gradient_sync
from pipelines.training.model_source import ModelSource, load_source
from pipelines.training.optim import (
    build_optimizer,
    build_scheduler,
    freeze_norm_statistics,
    scaled_lr,
    set_trainable_layers,
)
from pipelines.training.precision import Precision, resolve_precision
from pipelines.training.pretrained import load_backbone_file
from pipelines.training.progress import RankZeroLogger

log = get_logger("train")


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs, planned once by the driver (`pipelines.training.train.train`).

    Paths are absolute or URIs: the workers do not share the driver's working directory.
    """

    config: Config
    categories: dict[str, Any]  # CategoryMap.to_dict() of the shards
    fingerprint: str  # of the shards
    num_classes: int
    total_steps: int  # the schedule's length
    steps_per_epoch: int
    # where the weights start (`--init`): our checkpoint to fine-tune from, or `torchvision:FILE` (torchvision's Mask
    # R-CNN or ImageNet ResNet state dict, pipelines/training/pretrained.py)
    model_path: str | None = None
    backbone_weights: str | None = None  # a torchvision ResNet state dict
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None  # rank 0 logs metrics and tags here
    has_val: bool = False  # a "val" dataset shard exists
    # end this run early (with a checkpoint) while keeping the schedule planned for total_steps, so a long run
    # can be split across reservations and continued with --resume
    stop_at: int | None = None
    # loaded when Ray Train has no checkpoint of this run yet (Ray's recommended replacement for the deprecated
    # resume_from_checkpoint; after a worker failure Ray's own latest one wins)
    resume_from: str | None = None
    # called by every worker as `after_step(step, rank)` after each step and its checkpoint report; None in
    # production. Tests hang their fault drills here (tests/support/fault_drill.py).
    after_step: Callable[[int, int], None] | None = None

    @property
    def checkpoint_meta(self) -> dict[str, Any]:
        """What every checkpoint carries besides the tensors, so a model loads without the shards."""
        return {"config": self.config.to_dict(), "categories": self.categories, "fingerprint": self.fingerprint,
                "num_classes": self.num_classes}


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row produced a NaN/inf loss."""


@dataclass
class StepResult:
    losses: dict[str, float]
    total: float
    finite: bool
    lr: float


@dataclass
class StepRunner:
    """One optimisation step: sparse RPN targets densified and the flip applied on the device, forward under
    the chosen autocast, one all-ranks non-finite decision, loss scaling (fp16), clip, step.

    One device -> host transfer a step (every loss value, the total and the all-reduced finite flag together);
    the flip permutation moves to the device once."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    grad_clip: float
    flip: bool = True
    flip_perm: torch.Tensor | None = None
    seed: int = 0
    rank: int = 0
    max_nonfinite_in_a_row: int = 10
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    precision: Precision | None = None  # None: float32 (no autocast)
    scaler: torch.amp.GradScaler | None = field(default=None)  # fp16 only; None builds it from `precision`
    # post-local SGD (`train.local_sgd_every`): its local steps run without the gradient all-reduce and without
    # the all-ranks finite decision (a rank that skips a step alone pairs no collective wrongly); None: off
    local_sgd: LocalSGD | None = None

    def __post_init__(self):
        if self.flip_perm is not None:  # a constant: on the device once, not copied there every step
            self.flip_perm = self.flip_perm.to(self.device)
        if self.precision is None:
            self.precision = resolve_precision("off", self.device)
        if self.scaler is None:
            self.scaler = self.precision.grad_scaler()

    def flip_choice(self, step: int, n: int) -> torch.Tensor:
        """Which images of the batch are flipped at `step`: a pure function of (seed, step, rank), so a
        resumed run flips exactly as an uninterrupted one."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 7919 + self.rank)
        return torch.rand(n, generator=gen) < 0.5

    def __call__(self, batch: dict[str, torch.Tensor], step: int) -> StepResult:
        if self.flip and self.flip_perm is None:
            raise ValueError("flip augmentation needs the anchors' flip permutation (model.flip_perm), and this model "
                             "has none: its anchors are not mirror-symmetric; train with train.flip=false")
        batch = densify_rpn_deltas(to_device(batch, self.device))
        if self.flip and self.flip_perm is not None:
            which = self.flip_choice(step, batch["images"].shape[0])  # on the host: flip_batch reads it there
            batch = flip_batch(batch, flip_perm=self.flip_perm, which=which)
        self.model.train()
        freeze_norm_statistics(self.model)  # frozen stages (--layers heads / 4+) keep their BatchNorm statistics
        local = self.local_sgd is not None and self.local_sgd.local(step)
        with gradient_sync(self.model, local=local):
            return self._step(batch, local=local)

    def _step(self, batch: dict[str, torch.Tensor], *, local: bool) -> StepResult:
        with self.precision.autocast():
            loss_dict = self.model(batch)
        total = sum(loss_dict.values())
        lr = self.optimizer.param_groups[0]["lr"]
        # stays on the device: the all-reduce needs no host sync
        flag = finite_flag_on_every_rank(total, collective=not local)
        # every loss value, the total and the flag in ONE device -> host transfer (not one sync per value)
        host = torch.cat([torch.stack([v.detach().float().reshape(()) for v in (*loss_dict.values(), total)]),
                          flag.float()]).cpu().tolist()
        values, total_value, finite = dict(zip(loss_dict, host[:-2], strict=True)), host[-2], bool(host[-1])
        if not finite:
            # skip the step on every rank together: no update from a NaN/inf gradient; give up after too many
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} steps in a row gave a non-finite loss (last: {values}); "
                    "lower train.lr or check the data"
                )
            self.scheduler.step()
            return StepResult(values, float("nan"), False, lr)
        self.nonfinite_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.scaler
        (scaler.scale(total) if scaler is not None else total).backward()
        if self.grad_clip > 0:
            if scaler is not None:
                scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.grad_clip)
        if scaler is not None:
            scaler.step(self.optimizer)  # skipped by the scaler where fp16 gradients overflowed
            scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return StepResult(values, total_value, True, lr)


def finite_flag_on_every_rank(total: torch.Tensor, *, collective: bool = True) -> torch.Tensor:
    """int32 [1] on the loss's device: 1 where the loss is finite on EVERY rank, else 0 (a MIN all-reduce under
    torch.distributed), so that all ranks skip a step together. A rank that skipped `backward()` alone would
    pair the others' gradient all-reduces with its next step's, averaging mismatched gradients or hanging.
    No host sync: the flag is read with the loss values in the step's one transfer. `collective=False` (a local
    SGD step, no all-reduce to pair): this rank's own flag."""
    flag = torch.isfinite(total.detach()).to(torch.int32).reshape(1)
    if collective and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return flag


def validation_losses(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> dict:
    """Mean loss terms over `batches` with no update: the model in training mode (losses need targets) but
    BatchNorm in eval mode so running statistics stay as they are, and the global RNG left untouched (the
    samplers draw from it) so validation never changes the course of training. Under torch.distributed every
    rank must call it: the sums are all-reduced, so each rank returns the mean over every rank's batches."""
    was_training = model.training
    model.train()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
    sums = torch.zeros(len(LOSS_KEYS) + 1, dtype=torch.float64)  # the loss terms in LOSS_KEYS order, then count
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for batch in batches:
            losses = model(densify_rpn_deltas(to_device(batch, device)))
            sums += torch.tensor([float(losses[k]) for k in LOSS_KEYS] + [1.0], dtype=torch.float64)
    model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reduced = sums.to(device)  # NCCL reduces CUDA tensors only
        torch.distributed.all_reduce(reduced)
        sums = reduced.cpu()
    count = float(sums[-1])
    if count == 0:
        return {}
    mean = {f"val_{k}": float(v) / count for k, v in zip(LOSS_KEYS, sums[:-1], strict=True)}
    mean["val_loss"] = sum(mean.values())
    return mean


def validation_due(epoch: int, *, done: bool, epoch_ended: bool, every: int) -> bool:
    """Whether the validation loss is computed now, after `epoch` (0-based) ran to its end or was cut short by
    the last step: always after the last step, else after every `every`-th epoch (`train.val_every`; 0 = never
    before the last step: each validation re-streams the split, some 10 s on a small CPU box)."""
    return done or (epoch_ended and every > 0 and (epoch + 1) % every == 0)


GRAD_COMPRESSIONS = typing.get_args(GradCompression)


def compress_gradients(model: nn.Module, kind: str) -> bool:
    """`train.grad_compression`: "fp16" registers torch's `fp16_compress_hook` on a DDP model, halving what the
    gradient all-reduce moves (bench/bench_ddp.py, gloo on CPUs sharing a box: about 9% more images/s with a fresh
    model; in Ray Train with a trained model no gain was measured, BENCHMARKS.md). Returns whether a hook was
    registered (not for a single worker, which has no all-reduce). A `Config` holds only known kinds (checked when
    it is built); the check here is for other callers."""
    if kind not in GRAD_COMPRESSIONS:
        raise ValueError(f"train.grad_compression {kind!r}: choose one of {', '.join(GRAD_COMPRESSIONS)}")
    if kind == "none" or not isinstance(model, nn.parallel.DistributedDataParallel):
        return False

    model.register_comm_hook(state=None, hook=default_hooks.fp16_compress_hook)
    return True


def total_steps_for(config: Config, *, train_images: int, global_batch: int) -> tuple[int, int]:
    """(total steps, steps per epoch): `train.steps` when set, else `train.epochs` full epochs."""
    per_epoch = max(train_images // global_batch, 1)
    total = config.train.steps if config.train.steps > 0 else config.train.epochs * per_epoch
    return total, per_epoch


def restore(state_dir: str, model: nn.Module, optimizer, scheduler, *, scaler: torch.amp.GradScaler | None = None,
            rank: int = 0) -> tuple[int, int, int]:
    """Load a training checkpoint into model/optimizer/scheduler/GradScaler and this rank's random state;
    returns (step, epoch, batch_in_epoch)."""
    state = load_checkpoint(state_dir)
    load_model_state(unwrap(model), state.model)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    if state.scheduler is not None:
        scheduler.load_state_dict(state.scheduler)
    if scaler is not None and state.scaler is not None:
        scaler.load_state_dict(state.scaler)
    rng = rank_rng_state(state, rank)
    if rng is not None:
        set_rng_state(rng)
    return state.step, state.epoch, state.batch_in_epoch


def gather_rng_states(rank: int, world: int) -> list[dict[str, Any]]:
    """Every rank's `rng_state()` in rank order (a collective under torch.distributed: every rank calls it)."""
    mine = rng_state()
    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, mine)
    return states


def epoch_batches(shard, *, batch_size: int, seed: int, epoch: int, skip: int = 0,
                  device: torch.device | None = None, prefetch_batches: int = 2) -> Iterator[dict]:
    """One epoch of this worker's batches, shuffled locally with a seed that changes every epoch, skipping
    the first `skip` batches (already consumed before a resume).

    On a GPU the batches arrive on the device: Ray Data pins each collated batch and copies it with
    non_blocking=True on its background fetch thread, `prefetch_batches` ahead of the step, so the host-to-device
    copy is off the step's critical path. On a CPU they stay in (unpinned) host memory."""
    device = device or torch.device("cpu")
    it = shard.iter_torch_batches(
        batch_size=batch_size,
        drop_last=True,
        local_shuffle_buffer_size=batch_size * 8,
        local_shuffle_seed=seed * 1000 + epoch,
        device=device,
        pin_memory=device.type == "cuda",
        prefetch_batches=prefetch_batches,
    )
    for i, batch in enumerate(it):
        if i >= skip:
            yield batch


def timed(batches: Iterable[dict]) -> Iterator[tuple[dict, float]]:
    """(batch, seconds this loop waited for it): the time spent blocked on the input pipeline, which a
    step time alone would leave out."""
    it = iter(batches)
    while True:
        started = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch, time.perf_counter() - started


def prepare_device(model: nn.Module, device: torch.device, *, cudnn_benchmark: bool, channels_last: bool
                   ) -> nn.Module:
    """`train.cudnn_benchmark` (GPU workers only) and `train.channels_last` (any device: on a CPU oneDNN's
    convolutions run about 10% faster a step in channels_last, BENCHMARKS.md)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return model.to(memory_format=torch.channels_last) if channels_last else model


def train_loop_per_worker(train_loop_config: dict[str, LoopConfig]) -> None:
    """Ray Train entry point; `train_loop_config` is {"loop": LoopConfig}, planned by the driver."""
    import ray.train  # the worker's imports: the driver needs none of Ray Train's worker side
    import ray.train.torch

    setup_logging()
    loop_config = train_loop_config["loop"]
    config = loop_config.config
    tc = config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # all_gather_object over NCCL uses the current device
    record_placement(loop_config, rank, world)  # MLflow from rank 0 only
    torch.manual_seed(tc.seed)  # identical initial weights on every rank

    model = build_model(config, num_classes=loop_config.num_classes)
    init_messages = initialise(model, loop_config)
    set_trainable_layers(model, tc.layers)
    model = prepare_device(model, device, cudnn_benchmark=tc.cudnn_benchmark, channels_last=tc.channels_last)
    flip_perm = model.flip_perm  # None where the anchors are not mirror-symmetric (then train.flip is false)
    # anchors, flip permutation and pixel statistics are constant buffers: no need to re-broadcast each step
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    compress_gradients(model, tc.grad_compression)

    global_batch = tc.batch_size * world
    lr = scaled_lr(tc.lr, global_batch=global_batch, reference_batch=tc.lr_reference_batch)
    optimizer = build_optimizer(
        model, lr=lr, momentum=tc.momentum, weight_decay=tc.weight_decay, kind=tc.optimizer
    )
    total_steps = loop_config.total_steps
    scheduler = build_scheduler(
        optimizer,
        total_steps=total_steps,
        warmup_steps=tc.warmup_steps,
        schedule=tc.schedule,
        decay_at=tc.decay_at,
        decay_factor=tc.decay_factor,
    )
    precision = resolve_precision(tc.amp, device)
    scaler = precision.grad_scaler()
    if rank == 0:
        log.info("%s", precision.describe())
        if loop_config.mlflow_run_id:
            tracking.set_tag(loop_config.tracking_uri, loop_config.mlflow_run_id, "amp", precision.name)
    # post-local SGD after the warm-up (`train.local_sgd_every`; 0: DDP's all-reduce every step)
    local_sgd = LocalSGD(every=tc.local_sgd_every if world > 1 else 0, start=tc.warmup_steps)
    if rank == 0 and local_sgd.enabled:
        log.info("local SGD after step %d: the %d workers average their weights every %d steps",
                 local_sgd.start, world, local_sgd.every)
    step, epoch, skip = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None or loop_config.resume_from:
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                step, epoch, skip = restore(d, model, optimizer, scheduler, scaler=scaler, rank=rank)
        else:
            step, epoch, skip = restore(loop_config.resume_from, model, optimizer, scheduler, scaler=scaler,
                                        rank=rank)
        if rank == 0:
            log.info("restored from checkpoint at step %d (epoch %d, batch %d)", step, epoch, skip)
    elif rank == 0:
        for message in init_messages:
            log.info("%s", message)

    runner = StepRunner(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        grad_clip=tc.grad_clip,
        flip=tc.flip,
        flip_perm=flip_perm,
        seed=tc.seed,
        rank=rank,
        max_nonfinite_in_a_row=tc.max_nonfinite_in_a_row,
        precision=precision,
        scaler=scaler,
        local_sgd=local_sgd,
    )
    logger = RankZeroLogger(tc.log_every, total_steps, tracking_uri=loop_config.tracking_uri,
                            run_id=loop_config.mlflow_run_id) if rank == 0 else None
    meta = loop_config.checkpoint_meta
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if loop_config.has_val else None
    last_val: dict[str, float] = {}

    def report(batch_in_epoch: int, extra: dict[str, float]) -> None:
        # a checkpoint holds the workers' mean weights and optimizer state, which every rank then has
        local_sgd.sync(model, step, optimizer)
        metrics = {"step": step, "epoch": epoch, **last_val, **extra}
        metrics.setdefault("val_loss", float("inf"))  # the score attribute must exist in every report
        rng_by_rank = gather_rng_states(rank, world)  # every rank reports here together
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(
                tmp, model=model, optimizer=optimizer, scheduler=scheduler, step=step, epoch=epoch,
                batch_in_epoch=batch_in_epoch, meta={**meta, **last_val}, scaler=runner.scaler,
                rng_by_rank=rng_by_rank,
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    stop_at = min(loop_config.stop_at or total_steps, total_steps)
    while step < stop_at:
        batch_in_epoch, exhausted = skip, True
        batches = epoch_batches(train_shard, batch_size=tc.batch_size, seed=tc.seed, epoch=epoch, skip=skip,
                                device=device, prefetch_batches=tc.prefetch_batches)
        for batch, waited in timed(batches):
            t0 = time.perf_counter()
            result = runner(batch, step)
            step += 1
            batch_in_epoch += 1
            local_sgd.after_step(model, step)
            if logger:
                logger.step(step, epoch, result, runner, data_wait_s=waited, step_s=time.perf_counter() - t0,
                            images=global_batch)
            if step % tc.checkpoint_every == 0 and step < stop_at:
                report(batch_in_epoch, {"loss": result.total})
            if loop_config.after_step is not None:
                loop_config.after_step(step, rank)
            if step >= stop_at:
                exhausted = False  # perhaps complete; a resume finds out (its iterator then yields nothing)
                break
        if exhausted and batch_in_epoch == skip == 0:
            raise RuntimeError(f"an epoch gave this worker no batch of {tc.batch_size}: fewer images than the batch")
        skip = 0
        local_sgd.sync(model, step)  # the validation loss (and the epoch's checkpoint) of the averaged weights
        if val_shard is not None and validation_due(epoch, done=step >= stop_at, epoch_ended=exhausted,
                                                    every=tc.val_every):
            val_batches = val_shard.iter_torch_batches(batch_size=tc.batch_size, drop_last=False, device=device,
                                                       pin_memory=device.type == "cuda")
            last_val = validation_losses(model, val_batches, device)
            if logger:
                logger.validation(step, epoch, last_val)
        if exhausted:
            epoch, batch_in_epoch = epoch + 1, 0
        report(batch_in_epoch, {"nonfinite_steps": runner.nonfinite_total})
    if logger:
        logger.close()


def record_placement(loop_config: LoopConfig, rank: int, world: int) -> list[str]:
    """The Ray node of every rank (gathered over the process group); rank 0 tags the MLflow run with them
    (`worker_node.rank<r>`; a restart elsewhere overwrites them), so that where a run trained can be checked
    afterwards. Returns the node ids by rank. Best effort on the MLflow side: never fails training."""
    import ray  # worker side only

    nodes: list[Any] = [ray.get_runtime_context().get_node_id()]
    if world > 1 and dist.is_available() and dist.is_initialized():
        mine, nodes = nodes[0], [None] * world
        dist.all_gather_object(nodes, mine)
    if rank != 0 or not loop_config.mlflow_run_id:
        return nodes
    try:
        for r, node in enumerate(nodes):
            tracking.set_tag(loop_config.tracking_uri, loop_config.mlflow_run_id, f"worker_node.rank{r}", node)
    except Exception as exc:  # the tracking store is unreachable or busy: training matters more; said, not hidden
        log.warning("could not record the workers' nodes in MLflow: %s: %s", type(exc).__name__, exc)
    return nodes


def initialise(model: nn.Module, loop_config: LoopConfig) -> list[str]:
    """`--init` (any model source: our checkpoint, an MLflow model, `torchvision:FILE`; fine-tuning) and
    `--backbone-weights` (torchvision ResNet state dict), each a local path or a URI. Returns the lines that say
    what was loaded (rank 0 prints them)."""
    messages = []
    if loop_config.model_path:
        messages += load_source(model, ModelSource.parse(loop_config.model_path),
                                categories=CategoryMap.from_dict(loop_config.categories), config=loop_config.config,
                                fine_tune=True, tracking_uri=loop_config.tracking_uri)
    if loop_config.backbone_weights:
        load_backbone_file(model, loop_config.backbone_weights)
        messages.append(f"backbone weights from {loop_config.backbone_weights}")
    return messages
