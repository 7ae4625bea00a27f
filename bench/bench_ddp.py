"""What DDP's gradient all-reduce costs on a CPU box: 2 processes x 1 torch thread, batch 4 each, stepping
the same model (a) independently, (b) under DistributedDataParallel over gloo, (c) under DDP with the fp16
gradient-compression hook, (d, e) both with the gradients as views into DDP's buckets, (f) post-local SGD
(`train.local_sgd_every`, `--local-every` steps between weight averages). Prints img/s per process and in
total for each mode, run one after the other.

    .venv/bin/python bench/bench_ddp.py --shards SHARDS [--config shapes] [--set roi.sampling_ratio=1 ...]
        [--modes independent ddp ...] [--local-every 8]

SHARDS: preprocessed shards (`mrcnn-cli preprocess`) made with the same shard fields as the config.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script
from bench import options  # noqa: E402

MODES = ("independent", "ddp", "ddp-fp16", "ddp-view", "ddp-view-fp16", "local-sgd")
# DistributedDataParallel's keyword arguments by mode ("-view": gradients are views into the all-reduce buckets,
# no copy in and out of them each step)
DDP_KWARGS = {"ddp": {}, "ddp-fp16": {}, "ddp-view": {"gradient_as_bucket_view": True},
              "ddp-view-fp16": {"gradient_as_bucket_view": True}, "local-sgd": {}}
BATCH, STEPS, WARMUP = 4, 12, 2


def worker(rank: int, mode: str, args: argparse.Namespace, port: int, queue) -> None:
    from tune_preset import load_rows, take

    from mrcnn.config import load_config
    from mrcnn.model import build_model
    from pipelines.data.loader import ShardBatchDecoder, decoder_for
    from pipelines.training.local_sgd import LocalSGD
    from pipelines.training.loop import compress_gradients, prepare_device
    from pipelines.training.optim import build_optimizer, build_scheduler
    from pipelines.training.step import StepRunner

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = load_config(args.config, args.set)
    rows = load_rows(args.shards, "train2017")
    model = prepare_device(build_model(config, num_classes=4), torch.device("cpu"), cudnn_benchmark=False,
                           channels_last=config.train.channels_last)
    decoder = ShardBatchDecoder(**decoder_for(config, int(model.anchors.shape[0])))
    flip_perm = model.flip_perm
    if mode != "independent":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False, **DDP_KWARGS[mode])
        compress_gradients(model, "fp16" if mode.endswith("-fp16") else "none")
    optimizer = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    scheduler = build_scheduler(optimizer, total_steps=100, warmup_steps=0, schedule="cosine")
    # local SGD from the first step on (the timed steps include their averages)
    local_sgd = LocalSGD(every=args.local_every if mode == "local-sgd" else 0, start=0)
    runner = StepRunner(model=model, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"),
                        grad_clip=5.0, flip_perm=flip_perm, rank=rank, local_sgd=local_sgd)
    # rank r takes batches r, r + 2, r + 4, ... of the split, as a 2-worker split would
    batches = [take(rows, list(range((2 * i + rank) * BATCH, (2 * i + rank + 1) * BATCH)), decoder)
               for i in range(WARMUP + STEPS)]
    for step in range(WARMUP):
        runner(batches[step], step)
        local_sgd.after_step(model, step + 1)
    started = time.perf_counter()
    for step in range(WARMUP, WARMUP + STEPS):
        runner(batches[step], step)
        local_sgd.after_step(model, step + 1)
    local_sgd.sync(model, WARMUP + STEPS)
    queue.put(STEPS * BATCH / (time.perf_counter() - started))
    if mode != "independent":
        dist.destroy_process_group()


def main() -> None:
    parser = options.parser(__doc__)
    options.add_config(parser)
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--local-every", type=int, default=8, help="local-sgd: steps between weight averages")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    for i, mode in enumerate(args.modes):
        queue = ctx.Queue()
        # a port of its own for each mode: the previous mode's store may still hold its port
        procs = [ctx.Process(target=worker, args=(rank, mode, args, args.port + i, queue)) for rank in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        rates = [queue.get() for _ in procs]
        print(f"{mode:12s} img/s per process {rates[0]:.2f}, {rates[1]:.2f}; total {sum(rates):.2f}", flush=True)


if __name__ == "__main__":
    main()
