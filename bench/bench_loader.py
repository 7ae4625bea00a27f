"""The training loader's CPU work: images/s one core delivers through `ShardBatchDecoder` (decode + resize + mini-mask
unpacking + RPN target densifying + padding), and the image part (decode + resize) alone.

    PYTHONPATH=. .venv/bin/python bench/bench_loader.py --preset coco --images 128

Rows are made in-process by `RowMaker` from `../shared/data/coco128` (else synthetic 640x480-ish shapes), sent
through a real Arrow table of SHARD_SCHEMA, and decoded in batches of 4 as Ray Data's `map_batches` hands them, on
one torch thread. Run it with PYTHONPATH pointing at another checkout to measure that code (e.g. schema v1's,
whose rows hold the resized JPEG) on the same data and machine.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # after PYTHONPATH: the code measured is the checkout given there
from bench import options  # noqa: E402  (this checkout's)

COCO128 = REPO.parent / "shared" / "data" / "coco128"


def make_rows(config, images: int) -> tuple[dict[str, np.ndarray], float, str]:
    """(columns as map_batches gives them, mean stored image bytes, data source)."""
    import pyarrow as pa
    import torch

    from pipelines.data.coco import read_split, split_paths
    from pipelines.data.rows import RowMaker
    from pipelines.data.shards import SHARD_SCHEMA

    if COCO128.is_dir():
        annotations, root, source = *split_paths(str(COCO128), "train2017"), "coco128"
    else:
        import tempfile

        from pipelines.data.synth import make_synthetic_dataset

        tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
        make_synthetic_dataset(tmp, train=images, val=0, seed=0, min_size=480, max_size=640)
        annotations, root, source = *split_paths(str(tmp), "train2017"), "synthetic 640x480"
    maker = RowMaker(config.to_dict(), torch_threads=1)
    rows = []
    for record in read_split(annotations, root).records[:images]:
        row, _ = maker.make(record)
        if row is not None:
            rows.append({k: row[k] for k in SHARD_SCHEMA.names})
    torch.set_num_threads(1)
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    return columns, float(np.mean([len(r["image"]) for r in rows])), source


def time_decoder(config, columns: dict[str, np.ndarray], batch: int, repeats: int) -> float:
    """Seconds per image through ShardBatchDecoder, best of `repeats` passes."""
    from mrcnn.anchors import anchors_from_config
    from pipelines.data.loader import ShardBatchDecoder, decoder_for

    decoder = ShardBatchDecoder(**decoder_for(config, int(anchors_from_config(config).shape[0])))
    n = len(columns["image_id"])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for first in range(0, n, batch):
            decoder({k: v[first : first + batch] for k, v in columns.items()})
        best = min(best, time.perf_counter() - start)
    return best / n


def time_images(columns: dict[str, np.ndarray], repeats: int) -> float:
    """Seconds per image for the image alone: decode_row's image (decode, and in v2 resize) without the targets."""
    from pipelines.data import shards

    n = len(columns["image_id"])
    rows = [{k: v[i] for k, v in columns.items()} for i in range(n)]
    if hasattr(shards, "row_image"):  # schema v2: source bytes decoded and resized to the window
        def one(row):
            return shards.row_image(row)
    else:  # schema v1: the stored, already resized JPEG decoded by PIL (what decode_row did)
        import io

        from PIL import Image

        def one(row):
            with Image.open(io.BytesIO(bytes(row["image"]))) as img:
                return np.asarray(img.convert("RGB"))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for row in rows:
            one(row)
        best = min(best, time.perf_counter() - start)
    return best / n


def main() -> None:
    parser = options.parser(__doc__)
    options.add_sample(parser)
    parser.add_argument("--batch", type=int, default=4, help="rows per map_batches call (the loader's default)")
    parser.add_argument("--repeats", type=int, default=3, help="passes; the best is kept (a shared, noisy box)")
    args = parser.parse_args()

    from mrcnn.config import load_config
    from pipelines.data.shards import SCHEMA_VERSION

    config = load_config(args.preset)
    columns, image_bytes, source = make_rows(config, args.images)
    per_image_all = time_decoder(config, columns, args.batch, args.repeats)
    per_image_img = time_images(columns, args.repeats)
    results = {"schema_version": SCHEMA_VERSION, "preset": args.preset, "source": source,
               "images": len(columns["image_id"]), "stored_image_bytes": image_bytes,
               "decoder_images_per_s_per_core": 1 / per_image_all, "decoder_ms_per_image": 1000 * per_image_all,
               "image_only_ms_per_image": 1000 * per_image_img}
    print(f"## Loader, CPU ({args.preset} preset, {source}, schema v{SCHEMA_VERSION}, 1 thread)\n")
    print("| what | ms/image | images/s/core |")
    print("| --- | ---: | ---: |")
    print(f"| ShardBatchDecoder, batches of {args.batch} (image + targets + padding) | {1000 * per_image_all:.1f} | "
          f"{1 / per_image_all:.1f} |")
    print(f"| the image alone (decode{' + resize' if SCHEMA_VERSION >= 2 else ''}) | {1000 * per_image_img:.1f} | "
          f"{1 / per_image_img:.1f} |")
    print(f"\nstored image: {image_bytes / 1000:.1f} KB per image")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
