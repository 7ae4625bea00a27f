"""The training step on a CPU, three ways in one process: torch's per-parameter AdamW loop in the default memory
format (what the step was), the fused AdamW kernel, and fused + channels_last (the `shapes` preset now).

    .venv/bin/python bench/bench_cpu_step.py --shards SHARDS [--config shapes] [--set ...] [--threads 1]
        [--batch 8] [--steps 30] [--load weights.pt]

Each variant builds the same seeded model (or loads trained weights: a trained model sends more positives through
the mask head), warms up for 5 steps, then times `--steps` steps of `--batch` images read from the shards' train
split (no Ray); prints seconds a step, images/s and the ratio to the first variant. Also the optimizer step alone
(the loop vs fused) on the model's gradients.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tune_preset import load_rows, take  # noqa: E402

from mrcnn.config import load_config  # noqa: E402
from mrcnn.model import build_model  # noqa: E402
from pipelines.data.loader import ShardBatchDecoder, decoder_for  # noqa: E402
from pipelines.training.loop import prepare_device  # noqa: E402
from pipelines.training.optim import build_optimizer, build_scheduler  # noqa: E402
from pipelines.training.step import StepRunner  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script
from bench import options  # noqa: E402

VARIANTS = (("AdamW loop, contiguous", False, False), ("fused AdamW, contiguous", True, False),
            ("fused AdamW, channels_last", True, True))


def _optimizer(model, fused: bool) -> torch.optim.Optimizer:
    optimizer = build_optimizer(model, lr=1e-4, momentum=0.9, weight_decay=1e-4, kind="adamw")
    if not fused:  # the same groups through torch's default (per-parameter loop on a CPU)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
        optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999))
    return optimizer


def main() -> None:
    parser = options.parser(__doc__)
    options.add_config(parser)
    options.add_threads(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--load", default=None, help="start every variant from these weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.set)
    rows = load_rows(args.shards, "train2017")
    n = args.batch
    first = None
    for name, fused, channels_last in VARIANTS:
        torch.manual_seed(0)
        model = build_model(config, num_classes=4)
        if args.load:
            model.load_state_dict(torch.load(args.load, weights_only=True))
        model = prepare_device(model, torch.device("cpu"), cudnn_benchmark=False, channels_last=channels_last)
        decoder = ShardBatchDecoder(**decoder_for(config, int(model.anchors.shape[0])))
        batches = [take(rows, [(i * n + j) % len(rows["image_id"]) for j in range(n)], decoder)
                   for i in range(args.steps + 5)]
        optimizer = _optimizer(model, fused)
        scheduler = build_scheduler(optimizer, total_steps=10_000, warmup_steps=0, schedule="cosine")
        runner = StepRunner(model=model, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"),
                            grad_clip=5.0, flip_perm=model.flip_perm, seed=0)
        for step in range(5):
            runner(batches[step], step)
        started = time.perf_counter()
        for step in range(5, args.steps + 5):
            runner(batches[step], step)
        seconds = (time.perf_counter() - started) / args.steps
        first = first or seconds
        started = time.perf_counter()
        for _ in range(10):
            optimizer.step()
        opt_ms = (time.perf_counter() - started) / 10 * 1000
        print(f"{name:28s} {seconds:.3f} s/step  {n / seconds:5.1f} img/s  x{first / seconds:.2f}  "
              f"(optimizer step alone {opt_ms:.0f} ms)", flush=True)


if __name__ == "__main__":
    main()
