"""One GPU: our Mask R-CNN against torchvision's maskrcnn_resnet50_fpn, both from scratch, side by side in one run.

At 1024 px, R50-FPN, 81 classes, random ellipses (nothing downloaded). For each of batch 2 and 8 per GPU:
training images/s (forward, backward, optimizer step, under the AMP that `train.amp=auto` picks), peak GPU memory,
and host syncs per step (`torch.cuda.set_sync_debug_mode("warn")`, one warning per synchronising call); then
inference images/s at the largest batch. torchvision runs at its defaults (2000 proposals, 512 RoIs per image at 0.25
positive) and at our RoI counts and positive fraction (equal work). Ours runs through the training loop's own
StepRunner (sparse RPN deltas densified on the device, flips, one host transfer a step), torchvision through
the plain loop of its reference script (autocast, one `.item()` a step). Our variants with cudnn.benchmark and
channels_last are timed too, so that their defaults can follow the numbers. Ratios are printed at the end. Then
the evaluate stage's parts (bench/evaluate_gpu_parts.py: model images/s at batch 1, 4 and 8, the way back's cost
per image, the estimate for COCO val2017) and the shard images' decode + resize on the GPU against the CPU path
(bench/decode_gpu_parts.py). The JSON goes to --out.

Runs where only torch, torchvision, numpy, pillow and pyarrow are (no Ray, MLflow or pycocotools):

    PYTHONPATH=. python bench/bench_gpu.py --out bench_gpu.json          # about 3 minutes on one H200
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run as a script

from bench import options  # noqa: E402
from mrcnn.config import coco  # noqa: E402
from mrcnn.model import build_model  # noqa: E402
from pipelines.data.loader import to_device  # noqa: E402
from pipelines.training.optim import build_optimizer, build_scheduler  # noqa: E402
from pipelines.training.precision import resolve_precision  # noqa: E402
from pipelines.training.step import StepRunner  # noqa: E402
from tests.support.synthetic_batch import loader_batch, random_instances  # noqa: E402

NUM_CLASSES, INSTANCES = 81, 6
SIZE = 1024  # --size
BATCHES = (2, 8)  # --batches
DEVICE = torch.device("cuda")  # --device cpu: a smoke run of the script's own code, no timings worth reading


def _config():
    return coco().override([f"image.min_dim={SIZE}", f"image.max_dim={SIZE}"])


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _ours(batch_size: int, *, cudnn_benchmark: bool = False, channels_last: bool = False):
    config = _config()
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    model = build_model(config, NUM_CLASSES).to(DEVICE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images, per_image = random_instances(SIZE, batch_size, INSTANCES, NUM_CLASSES)
    batch = loader_batch(config, model.anchors.cpu(), images, per_image)
    optimizer = build_optimizer(model, lr=0.001, momentum=0.9, weight_decay=1e-4)
    scheduler = build_scheduler(optimizer, total_steps=10_000, warmup_steps=0, schedule="cosine")
    runner = StepRunner(model=model, optimizer=optimizer, scheduler=scheduler, device=DEVICE, grad_clip=5.0,
                        flip_perm=model.flip_perm, precision=resolve_precision("auto", DEVICE))
    # pinned, as Ray Data delivers it to a GPU worker (iter_torch_batches(pin_memory=True))
    pinned = {k: v.pin_memory() if DEVICE.type == "cuda" else v for k, v in batch.items()}
    state = {"step": 0}

    def train_step():
        runner(to_device(pinned, DEVICE), state["step"])
        state["step"] += 1

    def infer():
        model.eval()
        with torch.no_grad(), runner.precision.autocast():
            model(to_device(pinned, DEVICE))
        model.train()

    return train_step, infer, config


def _torchvision(batch_size: int, *, equal_work: bool):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    config = _config()
    kwargs = {}
    if equal_work:
        kwargs = {"rpn_post_nms_top_n_train": config.rpn.post_nms_train,
                  "rpn_batch_size_per_image": config.rpn.anchors_per_image,
                  "box_batch_size_per_image": config.roi.rois_per_image,
                  "box_positive_fraction": config.roi.positive_fraction}
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=SIZE,
                                  max_size=SIZE, box_score_thresh=0.0, **kwargs).to(DEVICE)
    images, per_image = random_instances(SIZE, batch_size, INSTANCES, NUM_CLASSES)
    host = [torch.from_numpy(img).permute(2, 0, 1).contiguous() for img in images]
    host = [x.pin_memory() for x in host] if DEVICE.type == "cuda" else host
    targets = [{"boxes": torch.from_numpy(b).to(DEVICE), "labels": torch.from_numpy(lab).to(DEVICE),
                "masks": torch.from_numpy(m).to(torch.uint8).to(DEVICE)} for b, m, lab in per_image]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9, weight_decay=1e-4)
    precision = resolve_precision("auto", DEVICE)
    scaler = precision.grad_scaler()

    def inputs():
        return [x.to(DEVICE, non_blocking=True).float().div_(255) for x in host]

    def train_step():  # torchvision/references/detection/engine.py train_one_epoch, without the logger
        with precision.autocast():
            losses = model(inputs(), targets)
            total = sum(losses.values())
        total.item()  # the reference reads the reduced loss every step
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()

    def infer():
        model.eval()
        with torch.no_grad(), precision.autocast():
            model(inputs())
        model.train()

    return train_step, infer, config


def _timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync()
    return (time.perf_counter() - started) / steps


def _syncs(fn) -> int:
    """Synchronising CUDA calls in one call of fn (warnings of torch's sync debug mode)."""
    if DEVICE.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(variant: str, batch_size: int, steps: int, warmup: int) -> dict:
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if variant == "ours":
        train_step, infer, _ = _ours(batch_size)
    elif variant == "ours-cudnn-benchmark":
        train_step, infer, _ = _ours(batch_size, cudnn_benchmark=True)
    elif variant == "ours-channels-last":
        train_step, infer, _ = _ours(batch_size, channels_last=True)
    else:
        train_step, infer, _ = _torchvision(batch_size, equal_work=variant == "torchvision-equal-work")
    seconds = _timed(train_step, steps, warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan")
    result = {"variant": variant, "batch": batch_size, "train_images_per_s": batch_size / seconds,
              "train_peak_gib": peak, "syncs_per_step": _syncs(train_step)}
    if batch_size == max(BATCHES):
        result["infer_images_per_s"] = batch_size / _timed(infer, max(steps // 2, 2), 1)
    torch.backends.cudnn.benchmark = False
    return result


def main() -> None:
    parser = options.parser(__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script's code (tests)")
    parser.add_argument("--skip-evaluate", action="store_true", help="leave out the evaluate stage's parts")
    args = parser.parse_args()
    global SIZE, DEVICE, BATCHES
    SIZE, DEVICE, BATCHES = args.size, torch.device(args.device), tuple(args.batches)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    precision = resolve_precision("auto", DEVICE)
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"{name}: torch {torch.__version__}, {SIZE} px, {precision.describe()}", flush=True)
    rows = []
    big = max(BATCHES)
    plan = [(v, b) for b in BATCHES for v in ("ours", "torchvision-default", "torchvision-equal-work")]
    plan += [("ours-cudnn-benchmark", big), ("ours-channels-last", big)]
    for variant, batch_size in plan:
        row = measure(variant, batch_size, args.steps, args.warmup)
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {(r["variant"], r["batch"]): r for r in rows}
    for b in BATCHES:
        ours = by[("ours", b)]
        for peer in ("torchvision-default", "torchvision-equal-work"):
            other = by[(peer, b)]
            print(f"batch {b}: ours / {peer}: train x{ours['train_images_per_s'] / other['train_images_per_s']:.2f}, "
                  f"peak memory x{ours['train_peak_gib'] / other['train_peak_gib']:.2f}, "
                  f"syncs {ours['syncs_per_step']} vs {other['syncs_per_step']}"
                  + (f", inference x{ours['infer_images_per_s'] / other['infer_images_per_s']:.2f}"
                     if b == big else ""))
    for extra in ("ours-cudnn-benchmark", "ours-channels-last"):
        print(f"batch {big}: {extra} / ours: train x"
              f"{by[(extra, big)]['train_images_per_s'] / by[('ours', big)]['train_images_per_s']:.2f}")
    report = {"training": rows}
    if not args.skip_evaluate:  # the evaluate stage's parts (issue 18): model images/s at batch 1/4/8, way back
        from bench.evaluate_gpu_parts import format_report, measure_evaluation_parts

        report["evaluation"] = measure_evaluation_parts(device=str(DEVICE), batch_sizes=(1, 4, 8),
                                                        min_confidences=(0.0, 0.05), cpus=os.cpu_count() or 1)
        print(format_report(report["evaluation"]), flush=True)
    from bench.decode_gpu_parts import format_decode, measure_decode  # issue 17: nvjpeg + resize vs the CPU path

    report["decode"] = measure_decode(preset="coco", images=64, batch=8)
    print(format_decode(report["decode"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
