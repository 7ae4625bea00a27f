"""Tune a preset without Ray: train from shards held in memory, then COCO-evaluate the validation split.

    .venv/bin/python bench/tune_preset.py --shards SHARDS [--config shapes] [--set train.steps=400 ...]
        [--min-confidence 0.05] [--threads 1] [--save weights.pt | --load weights.pt]

The same model, StepRunner (flip augmentation, clipping, schedule) and mapping back to original pixels as
`mrcnn-cli train` / `evaluate`, minus Ray's start-up and streaming costs, so that settings can be compared
in minutes on a CPU. The shards must have been made with the same shard fields (`--config`/`--set`) as the
model uses; the manifest's fingerprint is checked. Prints losses every 50 steps, then segm/bbox AP on the
first 48 training images (under- or over-fitting) and on the validation split.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from mrcnn.config import load_config
from mrcnn.model import build_model
from pipelines.data.categories import CategoryMap
from pipelines.data.coco_metrics import evaluate_detections
from pipelines.data.coco_results import to_coco_results
from pipelines.data.loader import ShardBatchDecoder, decoder_for
from pipelines.data.shardset import check_fingerprint, read_manifest
from pipelines.training.loop import prepare_device
from pipelines.training.optim import build_optimizer, build_scheduler, scaled_lr
from pipelines.training.step import StepRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script
from bench import options  # noqa: E402


def load_rows(shards: str, split: str) -> dict[str, np.ndarray]:
    """All rows of a split as columns of object arrays (what ShardBatchDecoder takes)."""
    tables = [pq.read_table(f).to_pydict() for f in sorted(Path(shards, split).glob("*.parquet"))]
    return {k: np.array(sum((t[k] for t in tables), []) + [None], dtype=object)[:-1] for k in tables[0]}


def take(columns: dict[str, np.ndarray], idx, decoder) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in decoder({k: c[idx] for k, c in columns.items()}).items()}


def coco_metrics(model, batches, annotations: str, coco_ids: list[int]) -> dict[str, float]:
    model.eval()
    detections, ids = [], []
    with torch.no_grad():
        for b in batches:
            for i, det in enumerate(model(b)):
                ids.append(int(b["image_ids"][i]))
                detections += to_coco_results(
                    det, image_id=ids[-1], scale=float(b["scales"][i]), window=b["windows"][i].tolist(),
                    height=int(b["heights"][i]), width=int(b["widths"][i]), coco_ids=coco_ids,
                )
    model.train()
    return evaluate_detections(annotations, detections, image_ids=sorted(ids)).metrics


def main() -> None:
    parser = options.parser(__doc__)
    options.add_config(parser)
    options.add_threads(parser)
    parser.add_argument("--min-confidence", type=float, default=None, help="detection threshold for the eval")
    parser.add_argument("--save", default=None, help="write the final weights here")
    parser.add_argument("--load", default=None, help="evaluate these weights, no training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(args.config, args.set)
    manifest = read_manifest(args.shards)
    check_fingerprint(manifest, config)
    coco_ids = list(CategoryMap.from_dict(manifest["categories"]).coco_ids)
    model = build_model(config, num_classes=len(coco_ids) + 1)
    model = prepare_device(model, torch.device("cpu"), cudnn_benchmark=False, channels_last=config.train.channels_last)
    if args.min_confidence is not None:
        model.detection_settings = replace(model.detection_settings, min_confidence=args.min_confidence)
    decoder = ShardBatchDecoder(**decoder_for(config, int(model.anchors.shape[0])))
    train, val = load_rows(args.shards, "train2017"), load_rows(args.shards, "val2017")
    n_train, n_val = len(train["image_id"]), len(val["image_id"])

    tc = config.train
    lr = scaled_lr(tc.lr, global_batch=tc.batch_size, reference_batch=tc.lr_reference_batch)
    optimizer = build_optimizer(
        model, lr=lr, momentum=tc.momentum, weight_decay=tc.weight_decay, kind=tc.optimizer
    )
    scheduler = build_scheduler(optimizer, total_steps=max(tc.steps, 1), warmup_steps=tc.warmup_steps,
                                schedule=tc.schedule, decay_at=tc.decay_at, decay_factor=tc.decay_factor)
    runner = StepRunner(model=model, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"),
                        grad_clip=tc.grad_clip, flip_perm=model.flip_perm, seed=tc.seed)
    rng, order, started = np.random.default_rng(tc.seed), [], time.perf_counter()
    if args.load:
        model.load_state_dict(torch.load(args.load, weights_only=True))
    for step in range(0 if args.load else tc.steps):
        if len(order) < tc.batch_size:
            order = list(rng.permutation(n_train))  # a new epoch, reshuffled
        result = runner(take(train, [order.pop() for _ in range(tc.batch_size)], decoder), step)
        if step % 50 == 0:
            rate = (step + 1) * tc.batch_size / (time.perf_counter() - started)
            terms = " ".join(f"{k[5:]}={v:.3f}" for k, v in result.losses.items())
            print(f"step {step} loss={result.total:.3f} {terms} lr={result.lr:.4f} {rate:.1f} img/s", flush=True)
    seconds = time.perf_counter() - started
    if args.save:
        torch.save(model.state_dict(), args.save)
    splits = manifest["splits"]
    for name, columns, count, gt_file in (
        ("train (first 48)", train, min(48, n_train), splits["train2017"]["annotations"]),
        ("val", val, n_val, splits["val2017"]["annotations"]),
    ):
        batches = [take(columns, list(range(i, min(i + 8, count))), decoder) for i in range(0, count, 8)]
        m = coco_metrics(model, batches, gt_file, coco_ids)
        print(f"{name}: segm AP {m['segm/AP']:.3f} AP50 {m['segm/AP50']:.3f} | "
              f"bbox AP {m['bbox/AP']:.3f} AP50 {m['bbox/AP50']:.3f}")
    print(f"{tc.steps if not args.load else 0} steps of {tc.batch_size} in {seconds:.0f} s; settings: {args.set}")


if __name__ == "__main__":
    main()
