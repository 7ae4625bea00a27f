"""Our Mask R-CNN vs torchvision's maskrcnn_resnet50_fpn on the same CPU and the same random batch.

Both R50-FPN with random weights (nothing downloaded), 512x512 inputs, batch 2, three gt instances per image,
81 classes. Measures a training step (forward, backward, SGD step) and inference (eval forward, plus the way
back to full-size masks: our `detections_to_original`, torchvision's own postprocess), as images/s, and the
peak memory as the growth of the process's peak RSS (resource.getrusage ru_maxrss) over the measured steps,
from just after the model and batch are built. Each measurement runs in its own subprocess, so peaks do not mix.

torchvision runs twice: at its defaults (512 RoIs per image in training) and with its RoI counts set to ours
(rpn_post_nms_top_n_train=2000, box_batch_size_per_image=200). Inference keeps every detection (score
threshold 0) in both, up to 100 per image, so the mask heads and pasting do full work as in COCO evaluation.
Our RPN targets are computed before timing: our pipeline does that in preprocessing, torchvision in the step.

    .venv/bin/python bench/bench_model.py --threads 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, when run as a script
from bench import options  # noqa: E402

SIZE, BATCH, NUM_CLASSES, INSTANCES = 512, 2, 81, 3
VARIANTS = ("ours", "torchvision-default", "torchvision-our-rois")


def _random_instances(seed: int = 0):
    """images uint8 [N, H, W, 3]; per image (boxes [G, 4] float32 x1y1x2y2, masks bool [G, H, W], labels [G])."""
    from tests.support.synthetic_batch import random_instances

    return random_instances(SIZE, BATCH, INSTANCES, NUM_CLASSES, seed=seed, sides=(40, 200))


def _our_model_and_batch():
    from mrcnn.config import coco
    from mrcnn.mini_masks import mini_mask_boxes, minimize_masks
    from mrcnn.model import build_model
    from mrcnn.rpn_targets import RPNTargetSettings, dense_rpn_targets

    config = coco().override(["image.min_dim=512", "image.max_dim=512"])
    model = build_model(config, NUM_CLASSES)
    rpn_rules = RPNTargetSettings.from_config(config)
    images, per_image = _random_instances()
    g, m, num_anchors = config.roi.max_gt_instances, config.mask.mini_mask_size, model.anchors.shape[0]
    batch = {
        "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "windows": torch.tensor([[0, 0, SIZE, SIZE]] * BATCH),
        "gt_class_ids": torch.zeros(BATCH, g, dtype=torch.int64),
        "gt_boxes": torch.zeros(BATCH, g, 4),
        "gt_mini_masks": torch.zeros(BATCH, g, m, m, dtype=torch.uint8),
        "crowd_boxes": torch.zeros(BATCH, 1, 4),
        "rpn_match": torch.zeros(BATCH, num_anchors, dtype=torch.int8),
        "rpn_deltas": torch.zeros(BATCH, num_anchors, 4),
    }
    for i, (boxes, masks, labels) in enumerate(per_image):
        boxes_t = torch.from_numpy(boxes)
        batch["gt_boxes"][i, :INSTANCES] = boxes_t
        batch["gt_class_ids"][i, :INSTANCES] = torch.from_numpy(labels)
        mini = minimize_masks(torch.from_numpy(masks), mini_mask_boxes(boxes_t), size=m)
        batch["gt_mini_masks"][i, :INSTANCES] = mini.to(torch.uint8)
        targets = rpn_rules.compute(anchors=model.anchors, gt_boxes=boxes_t, crowd_boxes=torch.zeros(0, 4))
        batch["rpn_match"][i], batch["rpn_deltas"][i] = dense_rpn_targets(num_anchors, *targets)
    model.detection_settings = replace(model.detection_settings, min_confidence=0.0)
    return model, batch


def _torchvision_model_and_batch(our_rois: bool):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    kwargs = {"rpn_post_nms_top_n_train": 2000, "box_batch_size_per_image": 200} if our_rois else {}
    model = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=NUM_CLASSES,
        min_size=SIZE,
        max_size=SIZE,
        box_score_thresh=0.0,
        **kwargs,
    )
    images, per_image = _random_instances()
    inputs = [torch.from_numpy(img).permute(2, 0, 1).float() / 255 for img in images]
    targets = [
        {"boxes": torch.from_numpy(b), "labels": torch.from_numpy(lab), "masks": torch.from_numpy(m).to(torch.uint8)}
        for b, m, lab in per_image
    ]
    return model, (inputs, targets)


def _train_step(variant: str, model, batch, optimizer) -> None:
    losses = model(batch) if variant == "ours" else model(*batch)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()


@torch.no_grad()
def _infer(variant: str, model, batch) -> None:
    if variant == "ours":
        from mrcnn.detections import detections_to_original

        for det in model(batch):
            detections_to_original(det, scale=1.0, window=(0, 0, SIZE, SIZE), height=SIZE, width=SIZE)
    else:
        model(batch[0])


def measure(variant: str, mode: str, steps: int, threads: int) -> dict:
    """One (model, mode) measurement in this process: images/s over `steps` after one warm-up step."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if variant == "ours":
        model, batch = _our_model_and_batch()
    else:
        model, batch = _torchvision_model_and_batch(our_rois=variant == "torchvision-our-rois")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "train":
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        run = lambda: _train_step(variant, model, batch, optimizer)  # noqa: E731
    else:
        model.eval()
        run = lambda: _infer(variant, model, batch)  # noqa: E731
    run()  # warm-up: allocator, oneDNN kernels
    start = time.perf_counter()
    for _ in range(steps):
        run()
    seconds = (time.perf_counter() - start) / steps
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "variant": variant,
        "mode": mode,
        "s_per_step": seconds,
        "images_per_s": BATCH / seconds,
        "peak_rss_growth_mb": (rss_peak - rss_before) / 1024,  # ru_maxrss is in KiB on Linux
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_threads(parser, default=2, help="torch threads in each measurement")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, steps=args.steps, threads=args.threads)))
        return

    results = {}
    for mode in ("train", "infer"):
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--one", variant, mode, f"--steps={args.steps}"]
            out = subprocess.run(command + [f"--threads={args.threads}"], capture_output=True, text=True, check=True)
            results[variant, mode] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[variant, mode]
            print(
                f"{mode:5s} {variant:22s} {r['images_per_s']:7.3f} img/s  {r['s_per_step']:7.2f} s/step  "
                f"peak RSS +{r['peak_rss_growth_mb']:7.0f} MB",
                flush=True,
            )
    print(f"\nratios ours / torchvision (threads={args.threads}, {args.steps} timed steps, batch {BATCH}, {SIZE}px):")
    for mode in ("train", "infer"):
        ours = results["ours", mode]
        for variant in VARIANTS[1:]:
            other = results[variant, mode]
            speed = ours["images_per_s"] / other["images_per_s"]
            memory = ours["peak_rss_growth_mb"] / max(other["peak_rss_growth_mb"], 1e-9)
            print(f"  {mode:5s} vs {variant:22s} speed x{speed:5.2f}   peak-memory growth x{memory:5.2f}")


if __name__ == "__main__":
    main()
