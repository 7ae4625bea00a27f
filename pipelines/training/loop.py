"""The Ray Train worker of `mrcnn-cli train`: `train_loop_per_worker` builds this worker's model (on its device,
under DDP), optimizer, schedule, step and hooks from the driver's `WorkerPlan`, restores a checkpoint where there
is one, and runs the trainer (pipelines/training/trainer.py) over its dataset shard.

Rank 0 alone writes checkpoints, logs to MLflow and prints progress (the hooks, pipelines/training/hooks/).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from mrcnn.config import GradCompression
from mrcnn.model import build_model
from pipelines.data.categories import CategoryMap
from pipelines.infra import tracking
from pipelines.infra.logs import get_logger, setup_logging
from pipelines.infra.system_metrics import SystemMetrics, node_label
from pipelines.training.checkpoints import restore
from pipelines.training.hooks.ap_eval import ApEvalHook
from pipelines.training.hooks.averaging import LocalSGDHook
from pipelines.training.hooks.checkpointing import CheckpointHook
from pipelines.training.hooks.progress import ProgressHook
from pipelines.training.hooks.step_callback import StepCallbackHook
from pipelines.training.hooks.validation import ValidationHook
from pipelines.training.local_sgd import LocalSGD
from pipelines.training.model_source import ModelSource, load_source
from pipelines.training.optim import build_optimizer, build_scheduler, set_trainable_layers
from pipelines.training.plan import WorkerPlan
from pipelines.training.precision import resolve_precision
from pipelines.training.pretrained import load_backbone_file
from pipelines.training.step import StepRunner
from pipelines.training.trainer import Hook, Trainer, TrainerState

log = get_logger("train")


def train_loop_per_worker(plan: WorkerPlan) -> None:
    """Ray Train entry point, given to `TorchTrainer` as `functools.partial(train_loop_per_worker, plan)`."""
    import ray.train  # the worker's imports: the driver needs none of Ray Train's worker side
    import ray.train.torch

    setup_logging()
    config = plan.config
    tc = config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # all_gather_object over NCCL uses the current device
    nodes = record_placement(plan, rank, world)  # MLflow from rank 0 only
    torch.manual_seed(tc.seed)  # identical initial weights on every rank

    model = build_model(config, num_classes=plan.num_classes)
    init_messages = initialise(model, plan)
    set_trainable_layers(model, tc.layers)
    model = prepare_device(model, device, cudnn_benchmark=tc.cudnn_benchmark, channels_last=tc.channels_last)
    flip_perm = model.flip_perm  # None where the anchors are not mirror-symmetric (then train.flip is false)
    # anchors, flip permutation and pixel statistics are constant buffers: no need to re-broadcast each step
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    compress_gradients(model, tc.grad_compression)

    optimizer = build_optimizer(model, lr=plan.lr, momentum=tc.momentum, weight_decay=tc.weight_decay,
                                kind=tc.optimizer)
    scheduler = build_scheduler(optimizer, total_steps=plan.total_steps, warmup_steps=tc.warmup_steps,
                                schedule=tc.schedule, decay_at=tc.decay_at, decay_factor=tc.decay_factor)
    precision = resolve_precision(tc.amp, device)
    scaler = precision.grad_scaler()
    if rank == 0:
        log.info("%s", precision.describe())
        if plan.mlflow_run_id:
            tracking.set_tag(plan.tracking_uri, plan.mlflow_run_id, "amp", precision.name)
    # post-local SGD after the warm-up (`train.local_sgd_every`; 0: DDP's all-reduce every step)
    local_sgd = LocalSGD(every=tc.local_sgd_every if world > 1 else 0, start=tc.warmup_steps)
    if rank == 0 and local_sgd.enabled:
        log.info("local SGD after step %d: the %d workers average their weights every %d steps",
                 local_sgd.start, world, local_sgd.every)
    state = TrainerState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None or plan.resume_from:
        # Ray Train's latest checkpoint of this run (after a worker failure) wins over --resume's
        with checkpoint.as_directory() if checkpoint is not None else nullcontext(plan.resume_from) as d:
            state.step, state.epoch, state.batch_in_epoch = restore(d, model, optimizer, scheduler, scaler=scaler,
                                                                    rank=rank)
        if rank == 0:
            log.info("restored from checkpoint at step %d (epoch %d, batch %d)", state.step, state.epoch,
                     state.batch_in_epoch)
    elif rank == 0:
        for message in init_messages:
            log.info("%s", message)

    runner = StepRunner(
        model=model, optimizer=optimizer, scheduler=scheduler, device=device, grad_clip=tc.grad_clip, flip=tc.flip,
        flip_perm=flip_perm, seed=tc.seed, rank=rank, max_nonfinite_in_a_row=tc.max_nonfinite_in_a_row,
        precision=precision, scaler=scaler, local_sgd=local_sgd,
    )
    train_shard = ray.train.get_dataset_shard("train")

    def batches(epoch: int, skip: int) -> Iterator[dict]:
        return epoch_batches(train_shard, batch_size=tc.batch_size, seed=tc.seed, epoch=epoch, skip=skip,
                             device=device, prefetch_batches=tc.prefetch_batches)

    val_batches = None
    if plan.has_val:
        val_shard = ray.train.get_dataset_shard("val")

        def val_batches() -> Iterator[dict]:
            return val_shard.iter_torch_batches(batch_size=tc.batch_size, drop_last=False, device=device,
                                                pin_memory=device.type == "cuda")

    hooks = worker_hooks(plan, local_sgd=local_sgd, val_batches=val_batches, device=device, rank=rank, world=world)
    with node_system_metrics(plan, nodes, rank=rank, local_rank=ctx.get_local_rank(), resume=state.step > 0):
        Trainer(runner, batches, last_step=plan.last_step, batch_size=tc.batch_size, hooks=hooks, state=state).train()


def node_system_metrics(plan: WorkerPlan, nodes: list[str], *, rank: int, local_rank: int, resume: bool
                        ) -> SystemMetrics:
    """This node's system metrics in the run (`train.system_metrics_interval`), sampled by its local rank 0 only:
    psutil and NVML see the whole node. Keys `system/<metric>`, or `system/node<i>/<metric>` when the run spans
    several nodes. `resume`: a restored worker continues the run's steps."""
    interval = plan.config.train.system_metrics_interval if local_rank == 0 else 0
    mine = nodes[rank] if rank < len(nodes) else nodes[0]
    return SystemMetrics(plan.tracking_uri, plan.mlflow_run_id, interval=interval, node_id=node_label(nodes, mine),
                         resume=resume)


def worker_hooks(plan: WorkerPlan, *, local_sgd: LocalSGD, val_batches: Callable[[], Iterable[dict]] | None,
                 device: torch.device, rank: int, world: int) -> list[Hook]:
    """The trainer's hooks on this worker, in the order they run at each point: local SGD averages before the
    validation loss and the checkpoints read the weights; the validation loss, then the quick COCO AP (rank 0,
    where `plan.ap_subset`), before the progress line and the checkpoint that carry them; the tests' callback
    after the step's checkpoint. A new hook is added here."""
    tc = plan.config.train
    hooks: list[Hook] = [LocalSGDHook(local_sgd)]
    if val_batches is not None:
        hooks.append(ValidationHook(val_batches, device=device, every=tc.val_every))
    if plan.ap_subset is not None and rank == 0:
        hooks.append(ApEvalHook(ap_batches(device, tc.batch_size), plan.ap_subset, device=device, every=tc.val_every,
                                min_confidence=plan.config.evaluate.min_confidence))
    if rank == 0:
        hooks.append(ProgressHook(tc.log_every, plan.total_steps, images_per_step=plan.global_batch,
                                  tracking_uri=plan.tracking_uri, run_id=plan.mlflow_run_id))
    hooks.append(CheckpointHook(tc.checkpoint_every, plan.checkpoint_meta, rank=rank, world=world))
    if plan.after_step is not None:
        hooks.append(StepCallbackHook(plan.after_step, rank=rank))
    return hooks


def ap_batches(device: torch.device, batch_size: int) -> Callable[[], Iterator[dict]]:
    """The quick COCO evaluation's rows (the "val_ap" dataset, whole on rank 0: not split between the workers),
    streamed again at each call."""
    import ray.train

    shard = ray.train.get_dataset_shard("val_ap")
    return lambda: shard.iter_torch_batches(batch_size=batch_size, drop_last=False, device=device)


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


def prepare_device(model: nn.Module, device: torch.device, *, cudnn_benchmark: bool, channels_last: bool
                   ) -> nn.Module:
    """`train.cudnn_benchmark` (GPU workers only) and `train.channels_last` (any device: on a CPU oneDNN's
    convolutions run about 10% faster a step in channels_last, BENCHMARKS.md)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return model.to(memory_format=torch.channels_last) if channels_last else model


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


def record_placement(loop_config: WorkerPlan, rank: int, world: int) -> list[str]:
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


def initialise(model: nn.Module, loop_config: WorkerPlan) -> list[str]:
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
