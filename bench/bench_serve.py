"""`mrcnn-cli serve` under load: requests/s and p50 / p99 latency at 1, 8 and 32 concurrent clients, batching on
(--max-batch 8) and off (--max-batch 1), side by side with a plain in-process loop over the same images (the
ceiling: `inference.detect_images` one image at a time, no HTTP, no Ray).

    .venv/bin/python bench/bench_serve.py --requests 96 --threads 1

Model: the `shapes` preset with seeded random weights (what is detected does not matter, only the cost; at
score_threshold 0 a random model keeps its max_detections, 20, per image: the way back does its full work).
Images: 16 synthetic 128 x 128-ish JPEGs (pipelines.data.synth), sent as the request body. One local Ray; each
application one model replica of `--threads` CPUs and torch threads; the in-process loop runs at the same threads.
Latency: from sending the request to reading the whole answer, through the standard library's http.client.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def make_model(out: Path) -> str:
    from mrcnn.config import shapes
    from mrcnn.model import build_model
    from pipelines.data.categories import CategoryMap
    from pipelines.training.checkpoints import save_checkpoint

    torch.manual_seed(0)
    categories = CategoryMap((1, 2, 3), ("circle", "square", "triangle"))
    model = build_model(shapes(), num_classes=categories.num_classes).eval()
    meta = {"config": shapes().to_dict(), "categories": categories.to_dict(), "num_classes": categories.num_classes}
    return str(save_checkpoint(out / "checkpoint", model=model, optimizer=None, scheduler=None, step=0, epoch=0,
                               batch_in_epoch=0, meta=meta))


def post(port: int, prefix: str, body: bytes) -> float:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", f"{prefix}/v1/predict?score_threshold=0", body=body,
                     headers={"Content-Type": "image/jpeg"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
    finally:
        conn.close()
    return time.perf_counter() - start


def load(port: int, prefix: str, bodies: list[bytes], clients: int, requests: int) -> dict[str, float]:
    post(port, prefix, bodies[0])  # warm
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(lambda i: post(port, prefix, bodies[i % len(bodies)]), range(requests)))
    wall = time.perf_counter() - started
    return {"req_s": requests / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def in_process(checkpoint: str, paths: list[Path], requests: int, threads: int) -> dict[str, float]:
    from pipelines.data.categories import CategoryMap
    from pipelines.data.coco import load_image_rgb
    from pipelines.evaluation.inference import detect_images, eager_runner
    from pipelines.models import load_model, model_spec

    torch.set_num_threads(threads)
    spec = model_spec(checkpoint)
    model = load_model(spec, min_confidence=0.0)
    run = eager_runner(model, torch.device("cpu"))
    coco_ids = list(CategoryMap.from_dict(spec.categories).coco_ids)
    latencies = []
    started = time.perf_counter()
    for i in range(requests):
        t = time.perf_counter()
        image = load_image_rgb(paths[i % len(paths)])  # decoding counts, as the server decodes
        detect_images(run, [image], image_ids=[0], min_dim=128, max_dim=128, coco_ids=coco_ids)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    latencies.sort()
    return {"req_s": requests / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96, help="requests per (clients, batching) cell")
    parser.add_argument("--threads", type=int, default=1, help="CPUs and torch threads of the model replica")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()

    import ray
    from ray import serve

    from pipelines.data.synth import make_synthetic_dataset
    from pipelines.infra.context import RunContext
    from pipelines.serving.options import ServeOptions
    from pipelines.serving.server import start_server
    from tests.support.http import free_port

    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    checkpoint = make_model(work)
    make_synthetic_dataset(work / "synth", train=1, val=16, seed=0)
    paths = sorted((work / "synth" / "val2017").glob("*.jpg"))
    bodies = [p.read_bytes() for p in paths]
    rows = {"in-process loop": in_process(checkpoint, paths, args.requests, args.threads)}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    port, ctx = free_port(), RunContext(use_gpu=False)
    for name, batch in (("batched", 8), ("unbatched", 1)):
        start_server(ServeOptions(checkpoint, port=port, cpus_per_replica=args.threads, max_batch=batch,
                                  batch_wait_ms=10), ctx, name=name, route_prefix=f"/{name}")
        for clients in args.clients:
            rows[f"serve {name} (max_batch {batch}), {clients} clients"] = load(port, f"/{name}", bodies, clients,
                                                                                 args.requests)
        serve.delete(name)
    serve.shutdown()
    print(f"{'':52s} {'req/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, row in rows.items():
        print(f"{name:52s} {row['req_s']:7.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
