"""The evaluate stage at the `coco` preset on coco128-derived shards, on CPUs: images/s and where each image's
time goes.

    .venv/bin/python bench/bench_evaluate.py parts --limit 8 --threads 1
    .venv/bin/python bench/bench_evaluate.py stage --limit 16 --workers 1

Shards: coco128's 128 images preprocessed at `coco` as split "val2017" into WORK/shards (made once, kept).
Model: the `coco` preset with seeded random weights (no COCO weights are downloaded), a checkpoint in
WORK/model. A random model scores every class about 1/81, so at `--min-confidence 0.0` (the old default) it
keeps max_detections (100) per image: the way back and RLE do their full work, an upper bound on a trained
model's cost; at 0.05 it keeps almost nothing.

`parts`: in this process, one image batch after another, the seconds per image of
  before: the training decoder (RPN targets built and unused), the model, the way back + RLE, all in turn in
          one actor (what `Predictor` did);
  after:  `inference.decode_inputs` (decode_row, no RPN targets), the model (`run_model`: packed outputs),
          `inference.way_back` (paste at original size, RLE, JSON);
  and COCOeval (bbox + segm) of the detections.
`stage`: `evaluate()` end to end through Ray (one local Ray, `--workers` model actors): images/s of the
inference (images / its wall time) and the stages' own seconds per image as the pipeline measured them.
Runs against an older checkout too (PYTHONPATH=OLD): then only the wall time is known.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # after PYTHONPATH: `stage` runs against an older checkout given there
from bench import options  # noqa: E402  (this checkout's)

COCO128 = REPO.parent / "shared" / "data" / "coco128"


def shards_and_model(work: Path) -> tuple[str, str]:
    """WORK/shards (coco128 at `coco`, split val2017) and WORK/model (a seeded random `coco` checkpoint)."""
    from mrcnn.config import coco
    from mrcnn.model import build_model
    from pipelines.data.categories import CategoryMap
    from pipelines.data.shardset import read_manifest
    from pipelines.training.checkpoints import save_checkpoint

    shards, model = work / "shards", work / "model"
    if not (shards / "manifest.json").exists():
        from pipelines.data.preprocess import preprocess

        splits = [("val2017", str(COCO128 / "annotations" / "instances_train2017.json"), str(COCO128 / "train2017"))]
        preprocess(coco(), splits=splits, out=str(shards), progress=False, max_workers=2)
    if not (model / "meta.json").exists():
        manifest = read_manifest(str(shards))
        categories = CategoryMap.from_dict(manifest["categories"])
        torch.manual_seed(0)
        net = build_model(coco(), num_classes=categories.num_classes)
        meta = {"config": coco().to_dict(), "categories": manifest["categories"], "fingerprint": coco().fingerprint(),
                "num_classes": categories.num_classes}
        save_checkpoint(model, model=net, optimizer=None, scheduler=None, step=0, epoch=0, batch_in_epoch=0, meta=meta)
    return str(shards), str(model)


def parts(args, shards: str, ckpt: str) -> dict:
    import pyarrow.parquet as pq

    from pipelines.data.categories import CategoryMap
    from pipelines.data.coco_metrics import evaluate_detections
    from pipelines.data.coco_results import run_model, to_coco_results
    from pipelines.data.loader import ShardBatchDecoder, decoder_for
    from pipelines.data.shardset import read_manifest
    from pipelines.evaluation.inference import decode_inputs, way_back
    from pipelines.models import load_model, model_spec

    torch.set_num_threads(args.threads)
    manifest = read_manifest(shards)
    spec = model_spec(ckpt, categories=manifest["categories"])
    config = spec.config
    model = load_model(spec, min_confidence=args.min_confidence)
    coco_ids = list(CategoryMap.from_dict(spec.categories).coco_ids)
    table = pq.read_table(f"{shards}/val2017").slice(0, args.limit)
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    n, step = len(rows["image_id"]), args.batch_size
    spent = {k: 0.0 for k in ("before_decode", "before_model", "before_way_back", "after_decode", "after_model",
                              "after_way_back", "coco_eval")}
    detections: list[dict] = []
    old_decoder = ShardBatchDecoder(**decoder_for(config, int(model.anchors.shape[0])))
    for first in range(0, n, step):
        chunk = {k: v[first : first + step] for k, v in rows.items()}
        # before: one actor doing everything in turn
        t0 = time.perf_counter()
        batch = {k: torch.as_tensor(v) for k, v in old_decoder(chunk).items()}
        t1 = time.perf_counter()
        with torch.no_grad():
            dets = model({"images": batch["images"], "windows": batch["windows"]})
        t2 = time.perf_counter()
        for j, det in enumerate(dets):
            json.dumps(to_coco_results(det, image_id=int(batch["image_ids"][j]), scale=float(batch["scales"][j]),
                                       window=batch["windows"][j].tolist(), height=int(batch["heights"][j]),
                                       width=int(batch["widths"][j]), coco_ids=coco_ids))
        t3 = time.perf_counter()
        spent["before_decode"] += t1 - t0
        spent["before_model"] += t2 - t1
        spent["before_way_back"] += t3 - t2
        # after: the three stages' functions
        t0 = time.perf_counter()
        inputs = decode_inputs(chunk, image_size=config.image.max_dim)
        t1 = time.perf_counter()
        packed = run_model(model, inputs["images"], inputs["window"], torch.device("cpu"),
                           max_detections=int(model.detection_settings.max_detections))
        t2 = time.perf_counter()
        packed.update({k: inputs[k] for k in ("image_id", "scale", "window", "height", "width", "decode_s")})
        packed["model_s"] = np.zeros(len(inputs["image_id"]))
        out = way_back(packed, categories=spec.categories)
        t3 = time.perf_counter()
        spent["after_decode"] += t1 - t0
        spent["after_model"] += t2 - t1
        spent["after_way_back"] += t3 - t2
        for text in out["results"]:
            detections.extend(json.loads(text))
    t0 = time.perf_counter()
    annotations = manifest["splits"]["val2017"]["annotations"]
    evaluate_detections(annotations, detections, image_ids=[int(i) for i in rows["image_id"]])
    spent["coco_eval"] = time.perf_counter() - t0
    per_image = {k: round(v / n, 4) for k, v in spent.items()}
    return {"images": n, "detections": len(detections), "threads": args.threads, "batch_size": step,
            "min_confidence": args.min_confidence, "seconds_per_image": per_image}


def stage(args, shards: str, ckpt: str) -> dict:
    import ray

    from mrcnn.config import EvalConfig
    from pipelines.evaluation.evaluate import EvaluateRequest, evaluate
    from pipelines.infra.context import RunContext

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}})
    work = Path(args.work)
    t0 = time.perf_counter()
    result = evaluate(EvaluateRequest(shards=shards, model_path=ckpt, out=str(work / "eval"), limit=args.limit,
                                      pictures=0, settings=EvalConfig(min_confidence=args.min_confidence,
                                                                      batch_size=args.batch_size)),
                      RunContext(workers=args.workers, use_gpu=False, tracking_uri=f"sqlite:///{work / 'mlflow.db'}"))
    total = time.perf_counter() - t0
    timings = getattr(result, "timings", {})
    report = {"images": args.limit, "workers": args.workers, "cpus": args.cpus, "min_confidence": args.min_confidence,
              "evaluate_s": round(total, 1), "evaluate_images_per_s": round(args.limit / total, 3)}
    if timings:
        report["inference_images_per_s"] = round(1 / timings["wall_s"], 3)
        report["seconds_per_image"] = {k: round(v, 4) for k, v in timings.items()}
        report["model_share_of_stage"] = round(timings["model_s"] / timings["wall_s"], 3)
    return report


def main() -> None:
    parser = options.parser(__doc__)
    parser.add_argument("mode", choices=("parts", "stage"))
    parser.add_argument("--work", default="/tmp/bench_evaluate")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    options.add_threads(parser, help="torch threads (parts)")
    parser.add_argument("--workers", type=int, default=1, help="model actors (stage)")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray (stage)")
    parser.add_argument("--min-confidence", type=float, default=0.0)
    args = parser.parse_args()
    from pipelines.infra.logs import setup_logging

    setup_logging()  # the stage's progress lines on stderr
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards, ckpt = shards_and_model(work)
    report = parts(args, shards, ckpt) if args.mode == "parts" else stage(args, shards, ckpt)
    print(json.dumps({"mode": args.mode, **report}, indent=1))


if __name__ == "__main__":
    main()
