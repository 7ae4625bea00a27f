"""A briefly trained `shapes` model, in-process (no Ray Train): the evaluation tests need detections that
mean something (a random model scores every class about 1/K and finds nothing above 0.05)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch

from mrcnn.config import shapes
from pipelines.data.categories import CategoryMap
from pipelines.data.loader import ShardBatchDecoder, decoder_for
from pipelines.data.shardset import read_manifest
from pipelines.training.checkpoints import save_checkpoint
from pipelines.training.optim import build_optimizer, build_scheduler
from pipelines.training.step import StepRunner


def train_shapes_checkpoint(shards: str, out: str | Path, *, steps: int = 60, batch_size: int = 4,
                            seed: int = 0) -> str:
    """Train the shapes preset for `steps` steps on the train2017 shards (one thread, seeded, same weights on
    every run of the same torch) and save a checkpoint under `out`; returns its directory."""
    config = shapes()
    manifest = read_manifest(shards)
    categories = CategoryMap.from_dict(manifest["categories"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        from mrcnn.model import build_model

        model = build_model(config, num_classes=categories.num_classes)
        table = pq.read_table(f"{shards}/train2017")
        rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        decoded = ShardBatchDecoder(**decoder_for(config, model.anchors.shape[0]))(rows)
        data = {k: torch.as_tensor(v) for k, v in decoded.items()}
        n = len(data["image_ids"])
        t = config.train
        optimizer = build_optimizer(model, lr=t.lr * batch_size / t.lr_reference_batch, momentum=t.momentum,
                                    weight_decay=t.weight_decay, kind=t.optimizer)
        scheduler = build_scheduler(optimizer, total_steps=steps, warmup_steps=min(10, steps), schedule="cosine")
        runner = StepRunner(model=model, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"),
                            grad_clip=t.grad_clip, flip_perm=model.flip_perm, seed=seed)
        order = torch.Generator().manual_seed(seed)
        for step in range(steps):
            idx = torch.randint(0, n, (batch_size,), generator=order)
            runner({k: v[idx] for k, v in data.items()}, step)
    finally:
        torch.set_num_threads(threads)
    meta = {"config": config.to_dict(), "categories": manifest["categories"], "fingerprint": config.fingerprint(),
            "num_classes": categories.num_classes}
    return str(save_checkpoint(Path(out) / "trained-shapes", model=model, optimizer=None, scheduler=None,
                               step=steps, epoch=0, batch_in_epoch=0, meta=meta))


def train_tiny_shapes(dataset: str | Path, out: str | Path, *, steps: int = 30, batch: int = 2) -> str:
    """A `shapes` model trained in-process for `steps` plain SGD steps on the train2017 split of a synthetic COCO
    dataset folder, on batches made by RowMaker and ShardBatchDecoder (the shard writer's and the loader's code,
    without Ray and without shards); its checkpoint directory under `out`."""
    from mrcnn.anchors import anchors_from_config
    from mrcnn.model import build_model
    from pipelines.data.coco import read_split, split_paths
    from pipelines.data.rows import RowMaker

    config = shapes()
    source = read_split(*split_paths(str(dataset), "train2017"))
    maker = RowMaker(config.to_dict(), torch_threads=None)
    rows = [row for row, _ in map(maker.make, source.records) if row is not None and row["num_instances"]]
    decoder = ShardBatchDecoder(**decoder_for(config, len(anchors_from_config(config))))
    torch.manual_seed(0)
    model = build_model(config, num_classes=source.categories.num_classes).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    first = last = None
    for step in range(steps):
        chunk = [rows[(step * batch + i) % len(rows)] for i in range(batch)]
        data = {k: torch.as_tensor(v) for k, v in decoder({k: [r[k] for r in chunk] for k in chunk[0]}).items()}
        loss = sum(model(data).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        last = float(loss.detach())
        first = last if first is None else first
    assert last < first, f"training did not lower the loss: {first:.3f} -> {last:.3f}"
    meta = {"config": config.to_dict(), "categories": source.categories.to_dict(),
            "num_classes": source.categories.num_classes}
    return str(save_checkpoint(Path(out) / "checkpoint", model=model.eval(), optimizer=None, scheduler=None,
                               step=steps, epoch=0, batch_in_epoch=0, meta=meta))
