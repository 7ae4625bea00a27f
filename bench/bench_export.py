"""ONNX export at the coco preset: onnxruntime vs eager PyTorch inference, images/s side by side, and the file size.

The model is the coco preset (ResNet-50-FPN) with the seeded, non-degenerate torchvision weights of
tests/support/torchvision_reference.py converted (nothing downloaded): about a hundred detections an image, so the
detection layer and the mask head do full work. Images: coco128 photos (`--images-dir`, default ../shared/data's)
put on the canvas as predict does, else random textures. Both runtimes get the same canvases and `--threads`
intra-op threads; the graph is exported for `--batch` images; the first batch of each is a warm-up, not timed. The
detection counts of the two are compared as a sanity check.

    PYTHONPATH=. .venv/bin/python bench/bench_export.py --threads 2 --images 8 --batch 2
    PYTHONPATH=. .venv/bin/python bench/bench_export.py --device cuda --threads 8 --images 64 --batch 4   # GPU
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, when run as a script
from bench import options  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _canvases(folder: Path, count: int, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    from pipelines.data.coco import load_image_rgb
    from pipelines.evaluation.inference import network_input
    from tests.support.torchvision_reference import sample_images

    paths = sorted(folder.glob("*.jpg"))[:count] if folder.is_dir() else []
    if len(paths) == count:
        prepared = [network_input(load_image_rgb(p), min_dim=min(800, size), max_dim=size) for p in paths]
        return (np.stack([c for c, _ in prepared]), np.asarray([g.window for _, g in prepared], np.int64),
                f"{count} coco128 photos")
    images = sample_images(size, [(0, 0, size, size)] * count).numpy()
    return images, np.tile(np.asarray([0, 0, size, size], np.int64), (count, 1)), f"{count} random textures"


def _timed(run, images: np.ndarray, windows: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """images/s over all batches but the first (warm-up), and the detection counts of all images."""
    counts = []
    start = None
    for first in range(0, len(images), batch):
        if first == batch:
            start = time.perf_counter()
        counts.append(run(images[first : first + batch], windows[first : first + batch])["det_count"])
    timed = len(images) - batch
    return timed / (time.perf_counter() - start), np.concatenate(counts)


def main() -> None:
    p = options.parser(__doc__)
    options.add_threads(p)
    p.add_argument("--images", type=int, default=8, help="images measured (the first batch is a warm-up)")
    p.add_argument("--batch", type=int, default=2, help="images per run (the exported graph's batch)")
    p.add_argument("--size", type=int, default=1024, help="image.max_dim (the coco preset's: 1024)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: eager on the GPU, onnxruntime's CUDA provider")
    p.add_argument("--images-dir", default=str(REPO.parent / "shared" / "data" / "coco128" / "train2017"))
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    if args.images < 2 * args.batch or args.images % args.batch:
        p.error("--images must be a multiple of --batch, at least two batches")

    import onnxruntime as ort

    from mrcnn.config import coco
    from mrcnn.model import build_model
    from mrcnn.torchvision_weights import TORCHVISION_NUM_CLASSES, load_torchvision_state
    from pipelines.data.coco_results import run_model
    from pipelines.evaluation.onnx_export import OnnxModel, export_onnx
    from pipelines.models import ModelSpec
    from pipelines.training.model_source import ModelSource
    from tests.support.torchvision_reference import torchvision_reference

    torch.set_num_threads(args.threads)
    config = coco().override([f"image.min_dim={min(800, args.size)}", f"image.max_dim={args.size}"])
    model = build_model(config, TORCHVISION_NUM_CLASSES)
    load_torchvision_state(model, torchvision_reference().state_dict(), class_rows=range(TORCHVISION_NUM_CLASSES))
    model.eval()
    spec = ModelSpec(config, {}, TORCHVISION_NUM_CLASSES, ModelSource("checkpoint", "seeded-torchvision"))
    images, windows, what = _canvases(Path(args.images_dir), args.images, args.size)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        size = export_onnx(model, spec, path, batch=args.batch)
        export_s = time.perf_counter() - start
        providers = ["CPUExecutionProvider"]
        if args.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                p.error(f"onnxruntime here has no CUDAExecutionProvider ({ort.get_available_providers()})")
            providers.insert(0, "CUDAExecutionProvider")
        exported = OnnxModel(path, providers=providers, threads=args.threads)
        ort_ips, ort_counts = _timed(exported, images, windows, args.batch)
    device = torch.device(args.device)
    model.to(device)
    max_det = config.detection.max_detections

    def eager(im, win):
        out = run_model(model, im, win, device, max_detections=max_det)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    eager_ips, eager_counts = _timed(eager, images, windows, args.batch)
    numbers = {"images": what, "size": args.size, "batch": args.batch, "threads": args.threads,
               "device": args.device, "providers": providers, "export_s": round(export_s, 1),
               "onnx_mb": round(size / 1e6, 1), "eager_images_per_s": round(eager_ips, 3),
               "onnxruntime_images_per_s": round(ort_ips, 3), "onnxruntime_vs_eager": round(ort_ips / eager_ips, 2),
               "detections_per_image": float(np.mean(eager_counts)),
               "counts_equal": bool(np.array_equal(eager_counts, ort_counts)),
               "torch": torch.__version__, "onnxruntime": ort.__version__}
    print(json.dumps(numbers, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=1) + "\n")


if __name__ == "__main__":
    main()
