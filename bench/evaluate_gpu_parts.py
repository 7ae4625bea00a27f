"""The evaluate stage's parts on a GPU machine, for bench/bench_gpu.py: what COCO val2017 (5,000 images) costs.

    from bench.evaluate_gpu_parts import measure_evaluation_parts
    report = measure_evaluation_parts(device="cuda")        # a dict, JSON-ready
    print(format_report(report))

Importable without Ray, MLflow or pycocotools (RLE is timed only where pycocotools is installed).

- model: the `coco` preset (R50-FPN, 1024 px, 81 classes), seeded random weights, random images of 1024 x 768
  in the 1024 canvas, `inference.run_model` (forward, detection layer, mask head, the packed outputs copied to
  the host) at batch 1, 4 and 8: images/s after `warmup` batches, synchronised. At min_confidence 0.0 a random
  model keeps max_detections (100) per image, the mask head's and the copy's full work (an upper bound); at
  0.05 (the evaluate default) it keeps about none, so both are measured.
- way back: `detections_to_original` of 100 detections (28 x 28 probabilities) onto a 640 x 480 image (COCO's
  usual size), on one CPU thread as a way-back task runs, and the RLE of the 100 masks when pycocotools is there:
  seconds per image.
- estimate: 5,000 images / min(model images/s at batch 8, way-back images/s x the CPU cores left for way-back
  tasks), the cores being `cpus` minus 2 (the model actor's and the driver's).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from mrcnn.config import coco
from mrcnn.detections import detections_to_original
from mrcnn.model import build_model
from pipelines.data.coco_results import run_model

VAL2017_IMAGES = 5000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_images_per_s(model: torch.nn.Module, device: torch.device, *, batch: int, min_confidence: float,
                       image_size: int = 1024, warmup: int = 2, iters: int = 5, seed: int = 0) -> float:
    """images/s of `run_model` (packed outputs on the host) at one batch size."""
    s = image_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, s, s), generator=gen, dtype=torch.uint8)
    images[:, :, 768:, :] = 0  # a 1024 x 768 image at the top-left of the canvas
    windows = torch.tensor([[0, 0, s, 768]] * batch, dtype=torch.int64)
    model.detection_settings = replace(model.detection_settings, min_confidence=min_confidence)
    max_det = int(model.detection_settings.max_detections)
    images_np, windows_np = images.numpy(), windows.numpy()
    for _ in range(warmup):
        run_model(model, images_np, windows_np, device, max_detections=max_det)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        run_model(model, images_np, windows_np, device, max_detections=max_det)
    _sync(device)
    return batch * iters / (time.perf_counter() - start)


def way_back_seconds(*, detections: int = 100, height: int = 480, width: int = 640, iters: int = 5,
                     seed: int = 0) -> dict[str, float | None]:
    """Seconds per image, one CPU thread: paste (detections_to_original) and RLE (None without pycocotools)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(seed)
        xy = torch.rand(detections, 2, generator=gen) * torch.tensor([900.0, 700.0])
        wh = 20 + torch.rand(detections, 2, generator=gen) * 300
        det = {"boxes": torch.cat([xy, xy + wh], dim=1), "scores": torch.rand(detections, generator=gen),
               "class_ids": torch.randint(1, 81, (detections,), generator=gen),
               "masks": torch.rand(detections, 28, 28, generator=gen)}
        scale, window = min(width, height) / 768, (0, 0, 1024, 768)
        start = time.perf_counter()
        for _ in range(iters):
            original = detections_to_original(det, scale=scale, window=window, height=height, width=width)
        paste = (time.perf_counter() - start) / iters
        rle = None
        try:
            import numpy as np
            import pycocotools.mask as mask_util
        except ImportError:
            pass
        else:
            masks = original["masks"].numpy().astype(np.uint8)
            start = time.perf_counter()
            for _ in range(iters):
                for j in range(len(masks)):
                    mask_util.encode(np.asfortranarray(masks[j]))
            rle = (time.perf_counter() - start) / iters
    finally:
        torch.set_num_threads(threads)
    return {"paste_s": paste, "rle_s": rle}


def measure_evaluation_parts(device: str | torch.device = "cuda", *, batch_sizes: tuple[int, ...] = (1, 4, 8),
                             min_confidences: tuple[float, ...] = (0.0, 0.05), cpus: int = 16,
                             warmup: int = 2, iters: int = 5) -> dict[str, Any]:
    """The measurements of the module docstring as a dict:
    {"device", "model_images_per_s": {"<min_confidence>": {"<batch>": images/s}}, "way_back_s_per_image":
    {"paste_s", "rle_s"}, "val2017_minutes": {"<min_confidence>": estimate}, "cpus"}."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = build_model(coco(), num_classes=81).to(device).eval()
    size = coco().image.max_dim
    speeds = {
        str(mc): {str(b): round(model_images_per_s(model, device, batch=b, min_confidence=mc, image_size=size,
                                                   warmup=warmup, iters=iters), 3) for b in batch_sizes}
        for mc in min_confidences
    }
    back = way_back_seconds(iters=iters)
    per_image = back["paste_s"] + (back["rle_s"] or 0.0)
    way_back_rate = max(1, cpus - 2) / per_image
    estimate = {mc: round(VAL2017_IMAGES / min(max(rates.values()), way_back_rate) / 60, 2)
                for mc, rates in speeds.items()}
    return {"device": str(device), "model_images_per_s": speeds,
            "way_back_s_per_image": {k: (round(v, 4) if v is not None else None) for k, v in back.items()},
            "way_back_images_per_s": round(way_back_rate, 2), "cpus": cpus, "val2017_minutes": estimate}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"evaluate parts on {report['device']}:"]
    for mc, rates in report["model_images_per_s"].items():
        lines.append(f"  model, min_confidence {mc}: " + ", ".join(f"batch {b} {r:.2f} images/s"
                                                                for b, r in rates.items()))
    back = report["way_back_s_per_image"]
    rle = f"{back['rle_s']:.4f} s" if back["rle_s"] is not None else "n/a (no pycocotools)"
    lines.append(f"  way back per image (100 detections, 640x480, 1 thread): paste {back['paste_s']:.4f} s, RLE {rle}"
                 f" -> {report['way_back_images_per_s']:.1f} images/s on {max(1, report['cpus'] - 2)} cores")
    lines.append("  COCO val2017 (5,000 images): " + ", ".join(f"{m} min at min_confidence {mc}"
                                                            for mc, m in report["val2017_minutes"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    result = measure_evaluation_parts(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available()
                                                                               else "cpu"))
    print(format_report(result))
    print(json.dumps(result))
