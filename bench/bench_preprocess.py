"""Preprocess benchmark: images/s per CPU core, peak memory at 1x vs 4x data, bytes per image by column.

    .venv/bin/python bench/bench_preprocess.py [--preset coco] [--images 128] [--workdir /tmp/bench_pp]

Data: `../shared/data/coco128` when present (real 640x480-ish photos), else synthetic 640x480-ish shapes.
Three timings of the same per-image work at the preset (coco: 1024 px, 65,472 anchors):
- reference: a plain single-threaded loop (PIL load + resize + JPEG encode, pycocotools annToMask per
  instance, roi_align mini-masks, DENSE RPN matching with torchvision box_iou over all anchors);
- row maker: `RowMaker.make` (what each Ray actor runs) in this process, one thread;
- ray: `preprocess()` end to end on a local Ray using every core (startup included), per core; and the
  marginal rate (extra images / extra seconds from 1x to 4x), where the fixed startup cancels out.
Bytes: per column of the written Parquet, and the source files' size per image (schema v2 stores those bytes).
Memory: the whole run (driver + raylet + workers + object store) in a subprocess, as the peak of the summed
PSS of its process tree, sampled every 0.2 s, at 1x and 4x the images (the 4x set repeats each image under
new ids). Prints a Markdown report (and --json FILE writes the numbers).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script
from bench import options  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COCO128 = REPO.parent / "shared" / "data" / "coco128"
COCO_TRAIN2017 = 118_287  # images in instances_train2017.json


# ---------------------------------------------------------------------------------------------- data


def dataset(workdir: Path, images: int) -> tuple[str, str]:
    """(annotations JSON, images folder) of `images` real or synthetic images."""
    if COCO128.is_dir():
        src = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
        return _repeat(src, workdir / f"coco_{images}.json", images), str(COCO128 / "train2017")
    from pipelines.data.synth import make_synthetic_dataset

    root = workdir / "synth"
    if not (root / "annotations" / "instances_train2017.json").exists():
        make_synthetic_dataset(root, train=min(images, 128), val=0, seed=0, min_size=480, max_size=640)
    src = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    return _repeat(src, workdir / f"synth_{images}.json", images), str(root / "train2017")


def _repeat(src: dict, path: Path, images: int) -> str:
    """A copy of `src` with `images` image records: copies k = 1, 2, ... reuse the files under new ids."""
    out = {**src, "images": [], "annotations": []}
    k = 0
    while len(out["images"]) < images:
        chosen = src["images"][: images - len(out["images"])]
        ids = {img["id"] for img in chosen}
        out["images"] += [{**img, "id": img["id"] + k * 10_000_000} for img in chosen]
        out["annotations"] += [{**ann, "id": ann["id"] + k * 10_000_000, "image_id": ann["image_id"] + k * 10_000_000}
                               for ann in src["annotations"] if ann["image_id"] in ids]
        k += 1
    path.write_text(json.dumps(out))
    return str(path)


# ---------------------------------------------------------------------------------------------- timings


def reference_loop(config, annotations: str, images_root: str) -> tuple[int, float]:
    """The plain per-image loop; returns (images, seconds)."""
    import torch
    from PIL import Image
    from pycocotools.coco import COCO
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.ops import box_iou, roi_align

    from mrcnn.anchors import anchors_from_config
    from mrcnn.geometry import resize_geometry

    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(annotations)
    anchors = anchors_from_config(config)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    size = config.mask.mini_mask_size
    count, start = 0, time.perf_counter()
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        things = [a for a in anns if not a["iscrowd"]]
        if not things:
            continue
        img = Image.open(f"{images_root}/{info['file_name']}").convert("RGB")
        geo = resize_geometry(img.height, img.width, min_dim=config.image.min_dim, max_dim=config.image.max_dim)
        resized = img.resize((geo.new_w, geo.new_h), Image.Resampling.BILINEAR)
        resized.save(io.BytesIO(), "JPEG", quality=config.image.jpeg_quality)
        gt = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in things)]) * geo.scale
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in things])).float()[:, None]  # [G, 1, H, W]
        lo = gt[:, :2].floor()
        boxes = torch.cat([lo, torch.maximum(gt[:, 2:].ceil(), lo + 1)], 1) / geo.scale  # mini boxes, original px
        rois = torch.cat([torch.arange(len(things))[:, None].float(), boxes], 1)
        mini = roi_align(masks, rois, size, aligned=True)[:, 0] >= 0.5  # each RoI reads its own mask
        np.packbits(mini.numpy())
        iou = box_iou(anchors, gt)  # dense [A, G]
        best, argmax = iou.max(1)
        col = iou.max(0).values
        positive = (best >= config.rpn.positive_iou) | ((iou == col) & (col > 0)).any(1)
        match = torch.zeros(len(anchors), dtype=torch.int8)
        match[(best >= config.rpn.negative_iou) & ~positive] = -1
        crowd = [a["bbox"] for a in anns if a["iscrowd"]]
        if crowd:
            cb = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in crowd]) * geo.scale
            match[(box_iou(anchors, cb).max(1).values >= config.rpn.crowd_iou) & ~positive] = -1
        match[positive] = 1
        deltas = torch.zeros(len(anchors), 4)
        deltas[positive] = coder.encode_single(gt[argmax[positive]], anchors[positive])
        count += 1
    return count, time.perf_counter() - start


def row_maker_loop(config, annotations: str, images_root: str) -> tuple[int, float]:
    """`RowMaker.make` over the same records in this process, one thread; returns (images, seconds)."""
    from pipelines.data.coco import read_split
    from pipelines.data.rows import RowMaker

    records = [r for r in read_split(annotations, images_root).records
               if any(not a["iscrowd"] for a in r["annotations"])]
    maker = RowMaker(config.to_dict(), torch_threads=1)
    start = time.perf_counter()
    for record in records:
        row, _ = maker.make(record)
        assert row is not None
    return len(records), time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- memory


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat parent ids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def ray_run(preset: str, annotations: str, images_root: str, out: Path, cpus: int) -> dict:
    """`preprocess()` in a fresh subprocess with its own local Ray; wall time and peak PSS of the tree."""
    code = f"""
import json, sys, time, ray
from mrcnn.config import load_config
from pipelines.data.preprocess import preprocess
from pipelines.data.shardset import read_manifest
ray.init(num_cpus={cpus}, include_dashboard=False, log_to_driver=False)
t = time.perf_counter()
preprocess(load_config({preset!r}), splits=[("train2017", {annotations!r}, {images_root!r})], out={str(out)!r},
           overwrite=True, progress=False)
m = read_manifest({str(out)!r})["splits"]["train2017"]
print(json.dumps({{"seconds": time.perf_counter() - t, "images": m["num_images"]}}))
"""
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_pss_kib(p) for p in _tree(proc.pid)))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess subprocess failed:\n{stderr[-4000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "peak_pss_mib": peak[0] / 1024}


def source_bytes_per_image(shards: Path, images_root: str) -> float:
    """Mean size of the source files of the rows written (what schema v2 stores as the image)."""
    import pyarrow.parquet as pq

    names = [n for path in sorted(shards.glob("*/*.parquet")) for n in pq.read_table(path, columns=["file_name"])
             .column(0).to_pylist()]
    return sum(os.path.getsize(f"{images_root}/{n}") for n in names) / max(len(names), 1)


def bytes_by_column(shards: Path) -> tuple[int, dict[str, float]]:
    """(rows, compressed bytes per row by column) over every Parquet file under `shards`."""
    import pyarrow.parquet as pq

    totals: dict[str, int] = {}
    rows = 0
    for path in sorted(shards.glob("*/*.parquet")):
        meta = pq.ParquetFile(path).metadata
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                name = col.path_in_schema.split(".")[0]
                totals[name] = totals.get(name, 0) + col.total_compressed_size
    return rows, {k: v / max(rows, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = options.parser(__doc__)
    options.add_sample(parser, images_help="images at 1x (4x for the memory run)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from mrcnn.config import load_config

    config = load_config(args.preset)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_pp_"))
    workdir.mkdir(parents=True, exist_ok=True)
    ann1, images_root = dataset(workdir, args.images)
    ann4, _ = dataset(workdir, 4 * args.images)
    source = "coco128" if COCO128.is_dir() else "synthetic 640x480"

    ref_n, ref_s = reference_loop(config, ann1, images_root)
    row_n, row_s = row_maker_loop(config, ann1, images_root)
    run1 = ray_run(args.preset, ann1, images_root, workdir / "shards1", args.cpus)
    rows, per_col = bytes_by_column(workdir / "shards1")
    source_bytes = source_bytes_per_image(workdir / "shards1", images_root)
    run4 = ray_run(args.preset, ann4, images_root, workdir / "shards4", args.cpus)

    results = {
        "preset": args.preset, "source": source, "cpus": args.cpus,
        "reference_images_per_s_per_core": ref_n / ref_s,
        "row_maker_images_per_s_per_core": row_n / row_s,
        "ray_1x": {**run1, "images_per_s_per_core": run1["images"] / run1["seconds"] / args.cpus},
        "ray_4x": {**run4, "images_per_s_per_core": run4["images"] / run4["seconds"] / args.cpus},
        # startup (actor processes importing torch, the first write task) cancels out of the 4x - 1x difference
        "ray_marginal_images_per_s_per_core": (run4["images"] - run1["images"]) / max(
            run4["seconds"] - run1["seconds"], 1e-9) / args.cpus,
        "bytes_per_image": {k: round(v) for k, v in per_col.items()},
        "bytes_per_image_total": round(sum(per_col.values())),
        "source_bytes_per_image": round(source_bytes),
    }
    marginal = results["ray_marginal_images_per_s_per_core"]
    results["coco_train2017_seconds_on_64_cores"] = COCO_TRAIN2017 / (64 * marginal)
    print(f"## Preprocess ({args.preset} preset, {source}, {args.cpus} CPU cores)\n")
    print("| what | images | seconds | images/s/core | peak PSS (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| reference per-image loop, 1 thread | {ref_n} | {ref_s:.1f} | {ref_n / ref_s:.1f} | |")
    print(f"| RowMaker.make in-process, 1 thread | {row_n} | {row_s:.1f} | {row_n / row_s:.1f} | |")
    for name, run in (("1x", results["ray_1x"]), ("4x", results["ray_4x"])):
        print(f"| preprocess() on Ray, {name}, startup included | {run['images']} | {run['seconds']:.1f} | "
              f"{run['images_per_s_per_core']:.1f} | {run['peak_pss_mib']:.0f} |")
    print(f"| preprocess() on Ray, marginal (4x - 1x): startup cancels out | {run4['images'] - run1['images']} | "
          f"{run4['seconds'] - run1['seconds']:.1f} | {results['ray_marginal_images_per_s_per_core']:.1f} | |")
    print(f"\nBytes per image on disk ({rows} rows, {results['bytes_per_image_total']} B total):\n")
    print("| column | bytes/image |")
    print("| --- | ---: |")
    for name, value in per_col.items():
        print(f"| {name} | {value:,.0f} |")
    print(f"\nSource files: {source_bytes:,.0f} B per image; the image column is "
          f"{per_col.get('image', 0) / max(source_bytes, 1):.3f}x that.")
    in_process = results["row_maker_images_per_s_per_core"]
    print(f"\nRowMaker / reference: x{in_process / results['reference_images_per_s_per_core']:.2f} per core; "
          f"Ray marginal / in-process: {marginal / in_process:.2f}.")
    print(f"Projection, COCO train2017 ({COCO_TRAIN2017:,} images) on 64 cores at the marginal rate: "
          f"{results['coco_train2017_seconds_on_64_cores']:.0f} s.")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
