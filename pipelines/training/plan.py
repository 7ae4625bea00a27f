"""The run as the driver plans it (`pipelines.training.train.train`) and every Ray Train worker receives it:
one frozen, picklable `WorkerPlan`, given to `train_loop_per_worker` as its one argument.

The driver knows the shards (images in the split, categories, fingerprint) and the number of workers; the
schedule's length and the global batch (which scales the learning rate) follow from them here, so that a
worker reads them instead of working them out again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mrcnn.config import Config
from pipelines.training.hooks.ap_eval import ApSubset
from pipelines.training.optim import scaled_lr


def total_steps_for(config: Config, *, train_images: int, global_batch: int) -> tuple[int, int]:
    """(total steps, steps per epoch): `train.steps` when set, else `train.epochs` full epochs."""
    per_epoch = max(train_images // global_batch, 1)
    total = config.train.steps if config.train.steps > 0 else config.train.epochs * per_epoch
    return total, per_epoch


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker needs, planned once by the driver.

    Paths are absolute or URIs: the workers do not share the driver's working directory.
    """

    config: Config
    categories: dict[str, Any]  # CategoryMap.to_dict() of the shards
    fingerprint: str  # of the shards
    num_classes: int
    total_steps: int  # the schedule's length
    steps_per_epoch: int
    global_batch: int  # train.batch_size x the number of workers: the images of one step, and the lr's scale
    # where the weights start (`--init`): our checkpoint to fine-tune from, or `torchvision:FILE` (torchvision's Mask
    # R-CNN or ImageNet ResNet state dict, pipelines/training/pretrained.py)
    model_path: str | None = None
    backbone_weights: str | None = None  # a torchvision ResNet state dict
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None  # rank 0 logs metrics and tags here
    has_val: bool = False  # a "val" dataset shard exists
    # the quick COCO evaluation's images (`train.val_ap_images`; hooks/ap_eval.py): a "val_ap" dataset holds their rows
    ap_subset: ApSubset | None = None
    # end this run early (with a checkpoint) while keeping the schedule planned for total_steps, so a long run
    # can be split across reservations and continued with --resume
    stop_at: int | None = None
    # loaded when Ray Train has no checkpoint of this run yet (Ray's recommended replacement for the deprecated
    # resume_from_checkpoint; after a worker failure Ray's own latest one wins)
    resume_from: str | None = None
    # called by every worker as `after_step(step, rank)` after each step and its checkpoint report; None in
    # production. Tests hang their fault drills here (tests/support/fault_drill.py).
    after_step: Callable[[int, int], None] | None = None

    @property
    def last_step(self) -> int:
        """The step count this run ends at: `stop_at` where it cuts the schedule short, else `total_steps`."""
        return min(self.stop_at or self.total_steps, self.total_steps)

    @property
    def lr(self) -> float:
        """`train.lr` scaled to the global batch (`train.lr_reference_batch`, optim.scaled_lr)."""
        tc = self.config.train
        return scaled_lr(tc.lr, global_batch=self.global_batch, reference_batch=tc.lr_reference_batch)

    @property
    def checkpoint_meta(self) -> dict[str, Any]:
        """What every checkpoint carries besides the tensors, so a model loads without the shards."""
        return {"config": self.config.to_dict(), "categories": self.categories, "fingerprint": self.fingerprint,
                "num_classes": self.num_classes}
