"""Training throughput: the Ray Data loader alone vs the training step, and 1 vs 2 Ray Train workers.

    .venv/bin/python bench/bench_train.py --preset shapes [--workers-compare] [--steps 20]

1. Loader: batches/s that `iter_torch_batches` delivers from the shards (decoding, mask unpacking, padding in
   Ray Data) with the model step removed, against the step rate of the model on the same batches in this
   process. The loader must be at least 5x faster than the step so the accelerator never waits on data.
2. With --workers-compare: images/s of `mrcnn-cli train` with 1 and with 2 CPU workers (Ray Train, DDP/gloo),
   read from the run's MLflow `images_per_s` metric (median over logged steps).
Peak RSS of this process is printed too. Shards are made from a synthetic dataset in a temp folder.
"""

from __future__ import annotations

import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray
import torch

from mrcnn.config import load_config
from mrcnn.model import build_model
from pipelines.data.coco import split_paths
from pipelines.data.loader import batches_dataset
from pipelines.data.preprocess import preprocess
from pipelines.data.shardset import ShardSet
from pipelines.data.synth import make_synthetic_dataset
from pipelines.training.optim import build_optimizer, build_scheduler
from pipelines.training.step import StepRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script
from bench import options  # noqa: E402


def make_shards(root: Path, config, images: int) -> str:
    make_synthetic_dataset(root / "ds", train=images, val=8, seed=0, min_size=480, max_size=640)
    splits = [(s, *split_paths(str(root / "ds"), s)) for s in ("train2017", "val2017")]
    preprocess(config, splits=splits, out=str(root / "shards"), progress=False)
    return str(root / "shards")


def loader_vs_step(shards: str, config, batches: int) -> None:
    model = build_model(config, num_classes=4)
    num_anchors = model.anchors.shape[0]
    ds = batches_dataset(ShardSet.open(shards), "train2017", config, num_anchors)
    bs = config.train.batch_size
    cached = []
    t0 = time.perf_counter()
    for i, batch in enumerate(ds.iter_torch_batches(batch_size=bs, drop_last=True, device="cpu")):
        if i == 0:
            t0 = time.perf_counter()  # the stream's start-up is a per-epoch cost, reported apart
        cached.append(batch)
        if len(cached) > batches:
            break
    loader_rate = (len(cached) - 1) / (time.perf_counter() - t0)
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    runner = StepRunner(model=model, optimizer=opt, scheduler=build_scheduler(opt, total_steps=100, warmup_steps=0,
                        schedule="cosine"), device=torch.device("cpu"), grad_clip=5.0, flip_perm=model.flip_perm)
    runner(cached[0], 0)  # warm-up
    t0 = time.perf_counter()
    for step, batch in enumerate(cached[1:], start=1):
        runner(batch, step)
    step_rate = (len(cached) - 1) / (time.perf_counter() - t0)
    print(f"loader: {loader_rate:.2f} batches/s ({loader_rate * bs:.1f} img/s), batch {bs}")
    print(f"step:   {step_rate:.2f} batches/s ({step_rate * bs:.1f} img/s), torch threads {torch.get_num_threads()}")
    print(f"loader / step = x{loader_rate / step_rate:.1f} (goal: >= x5)")


def workers_compare(shards: str, config, steps: int, root: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.infra.context import RunContext
    from pipelines.training.train import TrainRequest, train

    uri = f"sqlite:///{root / 'mlflow.db'}"
    rates = {}
    for workers in (1, 2):
        c = replace(config, train=replace(config.train, steps=steps, log_every=1, checkpoint_every=steps))
        result = train(c, TrainRequest(shards=shards, val_split=None, log_model=False),
                       RunContext(workers=workers, use_gpu=False, storage=str(root / f"ckpt{workers}"),
                                  tracking_uri=uri))
        history = [m.value for m in MlflowClient(uri).get_metric_history(result.run_id, "images_per_s")][2:]
        rates[workers] = statistics.median(history)
        print(f"{workers} worker(s): {rates[workers]:.3g} img/s (median over {len(history)} steps)")
    print(f"2 workers / 1 worker = x{rates[2] / rates[1]:.2f}")


def main() -> None:
    parser = options.parser(__doc__)
    parser.add_argument("--preset", default="shapes")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers-compare", action="store_true")
    args = parser.parse_args()
    config = load_config(args.preset)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_shards(root, config, args.images)
        loader_vs_step(shards, config, args.batches)
        if args.workers_compare:
            workers_compare(shards, config, args.steps, root)
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
