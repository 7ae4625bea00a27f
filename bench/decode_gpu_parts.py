"""Decode + resize of schema v2 shard images on a GPU (nvjpeg, `mrcnn.geometry.resize_image` in float32) against the
CPU path (libjpeg-turbo, torch's uint8 kernel, one thread), per image, and how far the GPU's pixels are from the CPU's.
bench/bench_gpu.py calls `measure_decode`; alone:

    PYTHONPATH=. python bench/decode_gpu_parts.py --images 64 --preset coco

Data: the JPEGs of `../shared/data/coco128` when present, else synthetic 640x480 JPEGs (q95). Needs only torch,
torchvision, numpy and PIL (no Ray, MLflow or pycocotools): the GPU machine has nothing else. Without CUDA it
times the CPU path only.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mrcnn.config import load_config
from mrcnn.geometry import resize_geometry
from pipelines.data.images import decode_canvas, decode_image, decode_resize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script
from bench import options  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "data" / "coco128" / "train2017"


def jpegs(count: int) -> list[bytes]:
    if COCO128.is_dir():
        files = sorted(COCO128.glob("*.jpg"))[:count]
        return [f.read_bytes() for f in files]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        h, w = (480, 640) if i % 2 else (640, 480)
        yy, xx = np.mgrid[:h, :w]
        pixels = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1) + rng.integers(-20, 21, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def timed(fn, repeats: int, sync: bool) -> float:
    best = float("inf")
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure_decode(*, preset: str = "coco", images: int = 64, batch: int = 8, repeats: int = 3) -> dict:
    """ms per image on the CPU path (one thread) and, with CUDA, on the GPU one image at a time and in
    `decode_canvas` batches of `batch`, plus the GPU's pixel difference from the CPU's; JSON-ready."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one decode task's CPU
    try:
        return _measure(preset, images, batch, repeats)
    finally:
        torch.set_num_threads(threads)


def _measure(preset: str, count: int, batch: int, repeats: int) -> dict:
    config = load_config(preset)
    data = jpegs(count)
    sizes = []
    for blob in data:
        h, w = decode_image(blob).shape[1:]
        geo = resize_geometry(h, w, min_dim=config.image.min_dim, max_dim=config.image.max_dim)
        sizes.append((geo.new_h, geo.new_w))
    windows = [(0, 0, w, h) for h, w in sizes]
    n = len(data)
    results: dict = {"preset": preset, "images": n, "batch": batch,
                     "source": "coco128" if COCO128.is_dir() else "synthetic"}

    def cpu_all():
        for blob, (h, w) in zip(data, sizes, strict=True):
            decode_resize(blob, h, w, "cpu")

    results["cpu_ms_per_image"] = 1000 * timed(cpu_all, repeats, False) / n
    if torch.cuda.is_available():
        device = torch.device("cuda")
        decode_resize(data[0], *sizes[0], device)  # nvjpeg handle, kernels: once

        def gpu_all():
            for blob, (h, w) in zip(data, sizes, strict=True):
                decode_resize(blob, h, w, device)

        def gpu_canvas():
            for first in range(0, n, batch):
                decode_canvas(data[first : first + batch], windows[first : first + batch],
                              config.image.max_dim, device)

        results["gpu_ms_per_image"] = 1000 * timed(gpu_all, repeats, True) / n
        results["gpu_canvas_ms_per_image"] = 1000 * timed(gpu_canvas, repeats, True) / n
        diffs = []
        for blob, (h, w) in zip(data, sizes, strict=True):
            cpu = decode_resize(blob, h, w, "cpu").int()
            gpu = decode_resize(blob, h, w, device).cpu().int()
            diffs.append((cpu - gpu).abs())
        results["gpu_vs_cpu_max_abs_diff"] = int(max(int(d.max()) for d in diffs))
        results["gpu_vs_cpu_mean_abs_diff"] = float(np.mean([float(d.float().mean()) for d in diffs]))
        results["device"] = torch.cuda.get_device_name(0)
    return results


def format_decode(results: dict) -> str:
    lines = [f"## Decode + resize, {results['source']} JPEGs at {results['preset']} ({results['images']} images)", "",
             "| path | ms/image |", "| --- | ---: |",
             f"| CPU, 1 thread (libjpeg-turbo, uint8 resize) | {results['cpu_ms_per_image']:.2f} |"]
    if "gpu_ms_per_image" in results:
        lines += [f"| GPU {results['device']}, one image at a time | {results['gpu_ms_per_image']:.2f} |",
                  f"| GPU, decode_canvas batches of {results['batch']} into the S x S canvas | "
                  f"{results['gpu_canvas_ms_per_image']:.2f} |", "",
                  f"GPU vs CPU pixels: max |diff| {results['gpu_vs_cpu_max_abs_diff']}, "
                  f"mean {results['gpu_vs_cpu_mean_abs_diff']:.3f} grey levels"]
    return "\n".join(lines)


def main() -> None:
    parser = options.parser(__doc__)
    options.add_sample(parser, images=64)
    parser.add_argument("--batch", type=int, default=8, help="images per decode_canvas call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = measure_decode(preset=args.preset, images=args.images, batch=args.batch, repeats=args.repeats)
    print(format_decode(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
