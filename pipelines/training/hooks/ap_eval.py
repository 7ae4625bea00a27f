"""The COCO AP of a quick evaluation as a hook: with each validation loss (`validation_due`), the model's
detections on a fixed subset of the validation split, evaluated with pycocotools against the split's annotations,
added to `trainer.state.val` as `bbox_AP` and `segm_AP` (the checkpoint report carries them to Ray Train, and to
Tune in a sweep: `mrcnn-cli tune --metric segm_AP`; rank 0 logs them to MLflow).

The subset (`ApSubset`, made once by the driver, `subset_of_split`): the first `train.val_ap_images` images of
the split by id and the ground truth of those images only. The driver hands the workers a dataset of those rows
alone (the "val_ap" dataset, `batches_dataset(image_ids=...)`), not split between the ranks (a split of equal
parts may leave rows out, and an image left out would count as all misses). Rank 0 alone detects on it, with
the evaluation's own path (`coco_results.run_model` -> `coco_results_of_batch`, at the evaluation's score
threshold `evaluate.min_confidence`), and runs COCOeval (`coco_metrics.evaluate_detections`); Ray Train and Tune
take rank 0's reports, and the other ranks wait at the checkpoint's barrier meanwhile.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipelines.data.coco_metrics import evaluate_detections
from pipelines.data.coco_results import coco_results_of_batch, run_model
from pipelines.infra.storage import read_bytes
from pipelines.training.hooks.validation import validation_due
from pipelines.training.trainer import Hook, Trainer

AP_METRICS = {"bbox_AP": "bbox/AP", "segm_AP": "segm/AP"}  # state.val key: evaluate_detections metric


@dataclass(frozen=True)
class ApSubset:
    """The images of the quick evaluation: their ids and their ground truth (a COCO dataset dict holding those
    images, their annotations and every category); `coco_ids`: the COCO id of each contiguous class (class i at
    i - 1)."""

    image_ids: frozenset[int]
    ground_truth: dict[str, Any]
    coco_ids: tuple[int, ...]


def ap_subset(ground_truth: dict[str, Any], shard_ids: Iterable[int], *, count: int,
              coco_ids: Iterable[int]) -> ApSubset:
    """The first `count` images by id of those in the shards (`shard_ids`) and in `ground_truth` (the split's
    annotations, a COCO dataset dict), with the ground truth cut to them."""
    known = {int(im["id"]) for im in ground_truth["images"]}
    ids = frozenset(sorted(known & {int(i) for i in shard_ids})[:count])
    cut = {
        "images": [im for im in ground_truth["images"] if int(im["id"]) in ids],
        "annotations": [a for a in ground_truth.get("annotations", []) if int(a["image_id"]) in ids],
        "categories": ground_truth["categories"],
    }
    return ApSubset(image_ids=ids, ground_truth=cut, coco_ids=tuple(int(c) for c in coco_ids))


def subset_of_split(shards: Any, split: str, *, count: int) -> ApSubset:
    """`ap_subset` of a split of a `ShardSet`: its annotations file as the manifest records it, its rows' ids."""
    from pipelines.data.categories import CategoryMap

    ground_truth = json.loads(read_bytes(shards.splits[split]["annotations"]))
    return ap_subset(ground_truth, shards.image_ids(split), count=count,
                     coco_ids=CategoryMap.from_dict(shards.categories).coco_ids)


class ApEvalHook(Hook):
    """At each epoch's end where `validation_due`: `subset_ap` of the detections on `batches()` (the subset's
    rows) into `trainer.state.val`. On rank 0 only, after the validation loss's hook (which replaces `state.val`)
    and before the progress and checkpoint hooks (which log and report it)."""

    def __init__(self, batches: Callable[[], Iterable[dict[str, torch.Tensor]]], subset: ApSubset, *,
                 device: torch.device, every: int, min_confidence: float):
        self.batches = batches
        self.subset = subset
        self.device = device
        self.every = every
        self.min_confidence = min_confidence

    def before_step(self, trainer: Trainer) -> None:
        # every report must carry the metric a sweep compares: -1 (COCOeval's "nothing to average") until the first
        # evaluation, as val_loss is inf until the first validation
        if AP_METRICS.keys() - trainer.state.val.keys():
            trainer.state.val = {**dict.fromkeys(AP_METRICS, -1.0), **trainer.state.val}

    def epoch_end(self, trainer: Trainer) -> None:
        s = trainer.state
        if validation_due(s.epoch, done=trainer.done, epoch_ended=s.epoch_ended, every=self.every):
            results = detect(trainer.model, self.batches(), self.device, coco_ids=self.subset.coco_ids,
                             min_confidence=self.min_confidence)
            s.val = {**s.val, **subset_ap(results, self.subset)}


def detect(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, *,
           coco_ids: tuple[int, ...], min_confidence: float) -> list[dict[str, Any]]:
    """COCO results (original pixels, COCO category ids) of the loader's batches (`images`, `windows` and the
    way back's `image_ids`, `scales`, `heights`, `widths`), as `evaluate` makes them: the model in eval mode at
    score threshold `min_confidence`, then left as it was (mode, detection settings, the global RNG)."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    settings, was_training = net.detection_settings, net.training
    net.detection_settings = dataclasses.replace(settings, min_confidence=min_confidence)
    net.eval()
    results: list[dict[str, Any]] = []
    try:
        with torch.random.fork_rng(devices=[]):
            for batch in batches:
                packed = run_model(net, batch["images"].cpu().numpy(), batch["windows"].cpu().numpy(), device,
                                   max_detections=int(settings.max_detections))
                packed.update(image_id=batch["image_ids"].cpu().numpy(), scale=batch["scales"].double().cpu().numpy(),
                              window=batch["windows"].cpu().numpy(), height=batch["heights"].cpu().numpy(),
                              width=batch["widths"].cpu().numpy())
                for image_results in coco_results_of_batch(packed, coco_ids=list(coco_ids)):
                    results += image_results
    finally:
        net.detection_settings = settings
        net.train(was_training)
    return results


def subset_ap(results: list[dict[str, Any]], subset: ApSubset) -> dict[str, float]:
    """{"bbox_AP", "segm_AP"} of `results` on the subset's images (COCOeval, pycocotools)."""
    metrics = evaluate_detections(subset.ground_truth, results, image_ids=subset.image_ids).metrics
    return {key: metrics[name] for key, name in AP_METRICS.items()}
