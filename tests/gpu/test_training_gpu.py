"""Training on a device: the `coco` geometry under the chosen AMP, the sub-nets on the device agreeing with the CPU,
empty cases, checkpoints across devices. Each check runs on the CPU always and on CUDA where present
(tests/support/devices.py: the cuda cases carry the `gpu` marker, skipped without CUDA by tests/conftest.py), so
CI runs the GPU path's code on the CPU. Imports only torch, torchvision, numpy and the project (the GPU machine
has no Ray, MLflow or pycocotools).

    python -m pytest tests/gpu -m gpu -q     # the cuda cases only
"""

from __future__ import annotations

import pytest
import torch

from mrcnn.config import coco, shapes
from mrcnn.detection_targets import sample_detection_targets
from mrcnn.detections import detect
from mrcnn.flip import flip_batch
from mrcnn.model import build_model
from pipelines.data.loader import densify_rpn_deltas, to_device
from pipelines.training.checkpoints import load_checkpoint, load_model_state, save_checkpoint
from pipelines.training.optim import build_optimizer, build_scheduler
from pipelines.training.precision import resolve_precision
from pipelines.training.step import StepRunner
from tests.support.devices import DEVICES
from tests.support.synthetic_batch import loader_batch, random_instances

CPU = torch.device("cpu")
on_each_device = pytest.mark.parametrize("device", DEVICES)


def _runner(model, device, precision):
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=0, schedule="cosine")
    return StepRunner(model=model, optimizer=opt, scheduler=sched, device=device, grad_clip=5.0,
                      flip=model.flip_perm is not None, flip_perm=model.flip_perm, precision=precision)


def _model_and_batch(config, n=2, instances=3, empty=(), num_classes=81, seed=0):
    torch.manual_seed(seed)
    model = build_model(config, num_classes)
    size = config.image.max_dim
    images, per_image = random_instances(size, n, instances, num_classes, seed=seed, empty=empty)
    return model, loader_batch(config, model.anchors, images, per_image)


@pytest.mark.slow  # on the CPU: 40 s or more
@on_each_device
def test_coco_geometry_at_batch_2_gives_finite_losses_and_one_step_changes_the_weights(device, one_thread):
    model, batch = _model_and_batch(coco())
    model = model.to(device)
    precision = resolve_precision("auto", device)
    # autocast on every GPU (bf16 where it exists, else fp16 with a scaler); none on the CPU
    assert (precision.dtype is not None) == (device.type == "cuda")
    runner = _runner(model, device, precision)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    result = runner(batch, step=0)
    assert result.finite and all(torch.isfinite(torch.tensor(list(result.losses.values()))))
    changed = [k for k, v in model.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert len(changed) > 0.9 * len(before), f"only {len(changed)} of {len(before)} parameters moved"


@on_each_device
@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_every_amp_choice_trains_a_step(amp, device, one_thread):
    model, batch = _model_and_batch(shapes(), num_classes=4)
    runner = _runner(model.to(device), device, resolve_precision(amp, device))
    assert runner(batch, step=0).finite
    assert (runner.scaler is not None) == (amp == "fp16")


@on_each_device
def test_sparse_rpn_deltas_densify_on_the_device_as_on_cpu(device):
    model, batch = _model_and_batch(coco())
    on_cpu = densify_rpn_deltas(batch)
    on_device = densify_rpn_deltas(to_device(batch, device))
    assert on_device["rpn_deltas"].device.type == device.type
    assert torch.equal(on_device["rpn_deltas"].cpu(), on_cpu["rpn_deltas"])


@on_each_device
def test_proposals_agree_on_cpu_and_the_device(device):
    config = coco()
    model, batch = _model_and_batch(config)
    gen = torch.Generator().manual_seed(0)
    a = model.anchors.shape[0]
    objectness = torch.randn(2, a, generator=gen) * 3  # distinct scores: no ties for top-k to order differently
    deltas = torch.randn(2, a, 4, generator=gen) * 0.5
    settings, post = model.proposal_settings, config.rpn.post_nms_train
    cpu, _ = settings.propose(objectness, deltas, model.anchors, batch["windows"], post_nms_topk=post)
    out, _ = settings.propose(objectness.to(device), deltas.to(device), model.anchors.to(device),
                              batch["windows"].to(device), post_nms_topk=post)
    for p, q in zip(cpu, out, strict=True):
        assert p.shape == q.shape
        torch.testing.assert_close(q.cpu(), p, rtol=0, atol=1e-3)


@on_each_device
def test_roi_pooling_agrees_on_cpu_and_the_device(device):
    config = coco()
    model, _ = _model_and_batch(config)
    gen = torch.Generator().manual_seed(1)
    size, c = config.image.max_dim, config.backbone.fpn_channels
    strides = model.pool_settings.strides
    pyramid = [torch.randn(2, c, size // s, size // s, generator=gen) for s in strides]
    xy = torch.rand(200, 2, generator=gen) * (size - 300)
    wh = torch.rand(200, 2, generator=gen) * 290 + 4  # every FPN level gets RoIs
    rois = torch.cat([torch.randint(0, 2, (200, 1), generator=gen).float(), xy, xy + wh], dim=1)
    cpu = model.pool_settings.pool(pyramid, rois, output_size=7)
    out = model.pool_settings.pool([p.to(device) for p in pyramid], rois.to(device), output_size=7)
    assert out.device.type == device.type
    torch.testing.assert_close(out.cpu(), cpu, rtol=1e-4, atol=1e-4)


@on_each_device
def test_mask_targets_agree_on_cpu_and_the_device(device):
    """Proposals = the gt boxes shifted by a pixel, all of them positive and all sampled: the same RoIs on both
    devices (in their own random order), so each RoI's class, deltas and mask target must agree."""
    config = coco()
    _, batch = _model_and_batch(config, instances=5)
    valid = batch["gt_class_ids"] > 0
    proposals = [batch["gt_boxes"][i][valid[i]] + 1.0 for i in range(2)]
    kwargs = {"rois_per_image": 10, "positive_fraction": 1.0, "positive_iou": 0.5, "crowd_iou": 0.001,
              "bbox_std": (0.1, 0.1, 0.2, 0.2), "mask_size": 28}
    keys = ("gt_class_ids", "gt_boxes", "gt_mini_masks", "crowd_boxes")
    on = []
    for where in (CPU, device):
        t = sample_detection_targets([p.to(where) for p in proposals],
                                     **{k: batch[k].to(where) for k in keys}, **kwargs)
        rois = t.rois_with_index().cpu()
        order = sorted(range(len(rois)), key=lambda r: tuple(rois[r].tolist()))
        on.append((rois[order], t.class_ids.cpu()[order], t.deltas.cpu()[order],
                   t.masks.cpu()[[i for i in order if t.class_ids[i] > 0]]))  # positives come first, as masks
    on_cpu, on_device = on
    assert len(on_cpu[0]) == 20 and (on_cpu[1] > 0).all()
    for got, want in zip(on_device, on_cpu, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-4)


@on_each_device
def test_detections_agree_on_cpu_and_the_device(device):
    gen = torch.Generator().manual_seed(2)
    r, k = 500, 81
    class_logits = torch.randn(r, k, generator=gen) * 4
    deltas = torch.randn(r, k, 4, generator=gen) * 0.3
    xy = torch.rand(r, 2, generator=gen) * 800
    rois = torch.cat([xy, xy + torch.rand(r, 2, generator=gen) * 200 + 8], dim=1)
    image_idx = torch.randint(0, 2, (r,), generator=gen)
    windows = torch.tensor([[0, 0, 1024, 1024], [0, 0, 1024, 700]])
    settings = {"bbox_std": (0.1, 0.1, 0.2, 0.2), "min_confidence": 0.05, "nms_threshold": 0.5, "max_detections": 100,
                "min_size": 0.01}
    cpu = detect(class_logits, deltas, rois, image_idx, windows, **settings)
    out = detect(*(x.to(device) for x in (class_logits, deltas, rois, image_idx, windows)), **settings)
    for p, q in zip(cpu, out, strict=True):
        assert torch.equal(q["class_ids"].cpu(), p["class_ids"])
        torch.testing.assert_close(q["boxes"].cpu(), p["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(q["scores"].cpu(), p["scores"], rtol=0, atol=1e-5)


@on_each_device
def test_the_flip_agrees_on_cpu_and_the_device(device):
    model, batch = _model_and_batch(coco())
    dense = densify_rpn_deltas(batch)
    which = torch.tensor([True, False])
    cpu = flip_batch(dense, flip_perm=model.flip_perm, which=which)
    out = flip_batch(to_device(dense, device), flip_perm=model.flip_perm.to(device), which=which)
    for key, value in cpu.items():
        assert torch.equal(out[key].cpu(), value), key


@on_each_device
@pytest.mark.parametrize("case", ["image without ground truth", "batch without positives", "level without rois"])
def test_empty_cases_run_forward_and_backward(case, device, one_thread):
    config = shapes()
    if case == "image without ground truth":
        model, batch = _model_and_batch(config, empty=(1,), num_classes=4)
    elif case == "batch without positives":
        model, batch = _model_and_batch(config, empty=(0, 1), num_classes=4)
    else:  # one tiny object: its RoIs all fall on P2, the other levels pool none
        model, batch = _model_and_batch(config, instances=1, num_classes=4)
        batch["gt_boxes"][:, 0] = torch.tensor([10.0, 10.0, 18.0, 18.0])
    runner = _runner(model.to(device), device, resolve_precision("auto", device))
    assert runner(batch, step=0).finite


@pytest.mark.slow  # on the CPU: fp16 autocast is slow there
@on_each_device
def test_a_checkpoint_saved_on_the_device_loads_on_cpu(tmp_path, device, one_thread):
    model, batch = _model_and_batch(shapes(), num_classes=4)
    runner = _runner(model.to(device), device, resolve_precision("fp16", device))
    runner(batch, step=0)
    torch.randn(3, device=device)  # the device's generator has been used
    save_checkpoint(tmp_path / "ck", model=model, optimizer=runner.optimizer, scheduler=runner.scheduler, step=1,
                    epoch=0, batch_in_epoch=1, meta={}, scaler=runner.scaler)
    state = load_checkpoint(tmp_path / "ck", map_location="cpu")
    assert all(v.device.type == "cpu" for v in state.model.values())
    if device.type == "cuda":
        assert len(state.rng_by_rank[0]["cuda"]) == torch.cuda.device_count()
    assert state.scaler["scale"] == runner.scaler.get_scale()
    fresh = build_model(shapes(), 4)
    load_model_state(fresh, state.model)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v.cpu()), k
