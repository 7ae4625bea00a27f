"""The per-worker loop's parts, without Ray Train: one step, the non-finite guard, flips, validation."""

from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from mrcnn.config import shapes
from mrcnn.model import build_model
from pipelines.data.loader import ShardBatchDecoder, decoder_for
from pipelines.training.hooks.validation import validation_due, validation_losses
from pipelines.training.loop import compress_gradients, prepare_device
from pipelines.training.optim import build_optimizer, build_scheduler
from pipelines.training.plan import total_steps_for
from pipelines.training.step import NonFiniteLossError, StepRunner
from pipelines.training.trainer import timed
from tests.support.one_weight import OneWeight


@pytest.fixture(scope="module")
def batch(synth_shards):
    table = pq.read_table(f"{synth_shards}/train2017").slice(0, 2)
    rows = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    config = shapes()
    torch.manual_seed(0)
    model = build_model(config, num_classes=4)
    decoded = ShardBatchDecoder(**decoder_for(config, model.anchors.shape[0]))(rows)
    return {k: torch.as_tensor(v) for k, v in decoded.items()}


def _runner(model, **kw):
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=0, schedule="cosine")
    flip_perm = getattr(model, "flip_perm", None)
    kw.setdefault("flip", flip_perm is not None)
    return StepRunner(model=model, optimizer=opt, scheduler=sched, device=torch.device("cpu"), grad_clip=5.0,
                      flip_perm=flip_perm, **kw)


def test_one_step_updates_the_model_and_the_schedule(batch):
    torch.manual_seed(0)
    model = build_model(shapes(), num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = _runner(model)
    result = runner(batch, step=0)
    assert result.finite and set(result.losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "loss_mask"}
    assert result.total == pytest.approx(sum(result.losses.values()), rel=1e-5)
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any("rpn" in k for k in changed) and any("mask" in k for k in changed)
    assert runner.scheduler.last_epoch == 1


def test_channels_last_on_a_cpu_changes_the_layout_not_the_step():
    """train.channels_last applies on a CPU too: the convolutions' weights are NHWC and one training step gives the
    losses and weights of the contiguous model (up to float rounding in oneDNN's other kernels)."""
    from tests.support.synthetic_batch import loader_batch, random_instances

    config = shapes()
    results = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = prepare_device(build_model(config, num_classes=4), torch.device("cpu"), cudnn_benchmark=False,
                               channels_last=channels_last)
        conv = model.backbone.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert conv.is_contiguous() != channels_last
        images, per_image = random_instances(128, 2, 3, num_classes=4)
        losses = _runner(model, flip=False)(loader_batch(config, model.anchors, images, per_image), step=0).losses
        results[channels_last] = losses, model.backbone.layer1[0].conv1.weight.detach().clone()
    (loss_a, w_a), (loss_b, w_b) = results[False], results[True]
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    assert torch.allclose(w_a, w_b, atol=1e-5)


@pytest.mark.parametrize("layers, frozen", [("heads", ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")),
                                            ("4+", ("conv1", "bn1", "layer1", "layer2"))])
def test_frozen_stages_do_not_change_at_all(batch, layers, frozen):
    """--layers heads / 4+ on the shapes preset (trainable BatchNorm): every tensor of a frozen stage, running
    statistics included, is bit-identical after some steps; the trained stages' statistics do move."""
    from pipelines.training.optim import resnet_stage, set_trainable_layers

    config = shapes()
    assert not config.backbone.frozen_bn  # BatchNorm2d with running statistics, not FrozenBatchNorm2d
    torch.manual_seed(0)
    model = build_model(config, num_classes=4)
    set_trainable_layers(model, layers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = _runner(model)
    for step in range(3):
        runner(batch, step=step)
    in_frozen = [k for k in before if resnet_stage(k) in frozen]
    assert any(k.endswith("running_mean") for k in in_frozen)  # buffers are among what is checked
    moved = [k for k in in_frozen if not torch.equal(model.state_dict()[k], before[k])]
    assert not moved, moved
    trained_stats = [k for k in before if k.endswith("running_mean") and resnet_stage(k) not in (*frozen, None)]
    if trained_stats:
        assert any(not torch.equal(model.state_dict()[k], before[k]) for k in trained_stats)


def test_anchors_without_mirror_symmetry_train_without_flips(batch):
    """flip_perm is None where the anchors are not mirror-symmetric (it crashed the loop's `.clone()`): a step
    without flips runs, flips are refused with the reason, and the config refuses train.flip there."""
    from mrcnn.config import ConfigError

    with pytest.raises(ConfigError, match=r"'train\.flip': flips need mirror-symmetric anchors"):
        shapes().override(["rpn.anchor_stride=2", "image.max_dim=192", "image.min_dim=192"])
    config = shapes().override(["train.flip=false", "rpn.anchor_stride=2", "image.max_dim=192", "image.min_dim=192"])
    torch.manual_seed(0)
    model = build_model(config, num_classes=4)
    assert model.flip_perm is None
    with pytest.raises(ValueError, match="not mirror-symmetric"):
        _runner(model, flip=True)(batch, step=0)
    # the 128 px batch on the 192 px canvas (padding on the bottom and right), with this geometry's anchors
    anchors = model.anchors.shape[0]
    small = {k: v[:1].clone() for k, v in batch.items()}
    small["images"] = torch.nn.functional.pad(small["images"], (0, 64, 0, 64))
    small["rpn_match"] = torch.zeros(1, anchors, dtype=batch["rpn_match"].dtype)
    small["rpn_pos_idx"] = torch.full_like(small["rpn_pos_idx"], -1)  # no positives on this anchor set
    assert _runner(model)(small, step=0).lr > 0


class _NaNModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, batch):
        return {"loss_cls": self.w * float("nan")}


def test_non_finite_steps_are_skipped_counted_then_stop(batch):
    model = _NaNModel()
    runner = _runner(model, flip=False, max_nonfinite_in_a_row=3)
    for step in range(2):
        result = runner(batch, step)
        assert not result.finite
    assert model.w.item() == 1.0 and runner.nonfinite_total == 2  # no update from a NaN
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        runner(batch, 2)


def test_flip_choice_is_a_function_of_seed_step_and_rank():
    model = nn.Linear(1, 1)
    a = StepRunner(model=model, optimizer=None, scheduler=None, device=torch.device("cpu"), grad_clip=0, seed=1)
    b = StepRunner(model=model, optimizer=None, scheduler=None, device=torch.device("cpu"), grad_clip=0, seed=1)
    c = StepRunner(model=model, optimizer=None, scheduler=None, device=torch.device("cpu"), grad_clip=0, seed=1, rank=1)
    assert torch.equal(a.flip_choice(5, 64), b.flip_choice(5, 64))
    assert not torch.equal(a.flip_choice(5, 64), a.flip_choice(6, 64))
    assert not torch.equal(a.flip_choice(5, 64), c.flip_choice(5, 64))
    assert 16 < int(a.flip_choice(5, 64).sum()) < 48


def test_validation_changes_neither_weights_nor_bn_stats_nor_rng(batch):
    torch.manual_seed(0)
    model = build_model(shapes(), num_classes=4)  # shapes: trainable BatchNorm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    val = validation_losses(model, [batch, batch], torch.device("cpu"))
    assert set(val) == {"val_loss", "val_loss_rpn_cls", "val_loss_rpn_box", "val_loss_cls", "val_loss_box",
                        "val_loss_mask"}
    assert val["val_loss"] == pytest.approx(sum(v for k, v in val.items() if k != "val_loss"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training


def test_total_steps_for():
    c = shapes()
    assert total_steps_for(replace(c, train=replace(c.train, steps=0, epochs=3)), train_images=10, global_batch=4) == (
        6, 2)
    assert total_steps_for(replace(c, train=replace(c.train, steps=7)), train_images=10, global_batch=4) == (7, 2)


def test_the_worker_plan_is_one_picklable_object_with_the_run_planned():
    """What the driver hands every worker: it survives pickling (Ray ships it), its lr is train.lr scaled to the
    global batch, and stop_at cuts the run short, never past the schedule."""
    import pickle

    from pipelines.training.plan import WorkerPlan
    from tests.support.fault_drill import FaultDrill

    c = shapes()
    c = replace(c, train=replace(c.train, lr=0.02, lr_reference_batch=16))
    plan = WorkerPlan(config=c, categories={"categories": []}, fingerprint="f", num_classes=4, total_steps=10,
                      steps_per_epoch=5, global_batch=4, stop_at=6, after_step=FaultDrill(3, "/nonexistent"))
    back = pickle.loads(pickle.dumps(plan))
    assert back.config == c and back.after_step.at_step == 3 and back.checkpoint_meta == plan.checkpoint_meta
    assert plan.lr == pytest.approx(0.02 * 4 / 16) and plan.last_step == 6
    assert replace(plan, stop_at=None).last_step == replace(plan, stop_at=50).last_step == 10


def test_validation_due_after_every_nth_epoch_and_always_after_the_last_step():
    # every epoch (the default): after each completed epoch and after the last step
    assert [validation_due(e, done=False, epoch_ended=True, every=1) for e in range(3)] == [True, True, True]
    # every 2nd: epochs 1, 3 (0-based), i.e. after the 2nd and 4th
    assert [validation_due(e, done=False, epoch_ended=True, every=2) for e in range(4)] == [False, True, False, True]
    # 0: never before the last step
    assert not any(validation_due(e, done=False, epoch_ended=True, every=0) for e in range(4))
    # the last step always validates, even mid-epoch and with 0
    assert validation_due(5, done=True, epoch_ended=False, every=0)
    assert validation_due(0, done=True, epoch_ended=False, every=3)


@pytest.fixture()
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _ddp_grads(kind: str) -> tuple[list[torch.Tensor], bool]:
    torch.manual_seed(0)
    net = nn.Linear(7, 3)
    ddp = nn.parallel.DistributedDataParallel(net)
    hooked = compress_gradients(ddp, kind)
    x = torch.randn(5, 7) * 1000.0  # gradients far from fp16-representable values
    (ddp(x) ** 2).sum().backward()
    return [p.grad.clone() for p in net.parameters()], hooked


def test_fp16_grad_compression_rounds_the_all_reduced_gradients_to_half(one_process_group):
    plain, hooked_plain = _ddp_grads("none")
    compressed, hooked = _ddp_grads("fp16")
    assert not hooked_plain and hooked
    for p, c in zip(plain, compressed, strict=True):
        assert not torch.equal(p, c)  # the hook changed what arrived ...
        assert torch.equal(c, p.half().float())  # ... by exactly the fp16 round trip (world size 1: sum / 1)


def test_grad_compression_needs_ddp_and_a_known_kind():
    assert not compress_gradients(nn.Linear(2, 2), "fp16")  # one worker: no all-reduce, nothing to hook
    with pytest.raises(ValueError, match="grad_compression 'int8'"):
        compress_gradients(nn.Linear(2, 2), "int8")


def _validate_on_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    # rank 0 sees the values 1 and 2, rank 1 sees 6: the mean over all three batches is 3
    mine = [[1.0, 2.0], [6.0]][rank]
    val = validation_losses(OneWeight(),  # w = 1: the loss terms are x times 1..5
                             [{"x": torch.tensor([v])} for v in mine], torch.device("cpu"))
    torch.save(val, f"{out}.{rank}")
    dist.destroy_process_group()


def test_validation_losses_are_the_mean_over_every_ranks_batches(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_validate_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "val")), nprocs=2)
    for rank in range(2):
        val = torch.load(tmp_path / f"val.{rank}", weights_only=True)
        assert val["val_loss_rpn_cls"] == pytest.approx(3.0)  # (1 + 2 + 6) / 3, not rank 0's 1.5
        assert val["val_loss_mask"] == pytest.approx(15.0)
        assert val["val_loss"] == pytest.approx(3.0 * (1 + 2 + 3 + 4 + 5))


def _step_on_rank(rank: int, world: int, store: str, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    # a rank left waiting in an all-reduce the other never joins fails after the timeout instead of hanging
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(OneWeight())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=0, schedule="cosine")
    runner = StepRunner(model=model, optimizer=opt, scheduler=sched, device=torch.device("cpu"), grad_clip=0.0,
                        flip=False, rank=rank, max_nonfinite_in_a_row=2)
    finite = []
    for step in range(3):
        x = torch.tensor([float("nan") if (rank == 1 and step == 1) else 1.0 + step])  # rank 1's step 1 only
        finite.append(runner({"x": x}, step).finite)
    torch.save({"finite": finite, "w": model.module.w.detach().clone(), "skipped": runner.nonfinite_total},
               f"{out}.{rank}")
    dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """Rank 1's loss alone is NaN at step 1: both ranks skip that step (counted on both), so their weights stay
    equal; with a rank-local decision rank 0 would run backward alone and wait in DDP's all-reduce."""
    import torch.multiprocessing as mp

    mp.spawn(_step_on_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    first, second = (torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2))
    assert first["finite"] == second["finite"] == [True, False, True]
    assert first["skipped"] == second["skipped"] == 1
    assert torch.equal(first["w"], second["w"]) and not torch.equal(first["w"], torch.ones(1))


def test_fine_tuning_the_real_model_from_a_checkpoint_with_another_number_of_classes(tmp_path):
    """`--model-path` into a model with fewer classes: every tensor that fits is the checkpoint's, the
    class-specific layers alone are fresh, and the loop says which."""
    from pipelines.training.checkpoints import save_checkpoint
    from pipelines.training.loop import initialise
    from pipelines.training.plan import WorkerPlan

    config = shapes()
    torch.manual_seed(0)
    source = build_model(config, num_classes=6)
    save_checkpoint(tmp_path / "ckpt", model=source, optimizer=None, scheduler=None, step=7, epoch=1, batch_in_epoch=0,
                    meta={"config": config.to_dict(), "categories": {"categories": []}, "num_classes": 6})
    torch.manual_seed(1)
    target = build_model(config, num_classes=4)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    loop = WorkerPlan(config=config, categories={"categories": []}, fingerprint="f", num_classes=4, total_steps=1,
                      steps_per_epoch=1, global_batch=1, model_path=str(tmp_path / "ckpt"))
    messages = initialise(target, loop)
    assert messages[0] == f"initialised from {tmp_path / 'ckpt'} (step 7)"
    assert messages[1].startswith("different number of classes: re-initialised the class-specific layers")
    theirs = source.state_dict()
    reinitialised = [k for k, v in target.state_dict().items() if v.shape != theirs[k].shape]
    assert reinitialised and all(k.split(".")[0] in ("box_head", "mask_head") for k in reinitialised)
    for key, value in target.state_dict().items():
        expected = fresh[key] if key in reinitialised else theirs[key]
        assert torch.equal(value, expected), key
    assert all(k in messages[1] for k in reinitialised)


def test_timed_says_how_long_the_loop_waited_for_each_batch():
    import time as _time

    def slow():
        for i in range(3):
            _time.sleep(0.05 if i == 1 else 0.0)  # the input pipeline stalls before batch 1
            yield {"i": i}

    got = list(timed(slow()))
    assert [b["i"] for b, _ in got] == [0, 1, 2]
    waits = [w for _, w in got]
    assert all(w >= 0 for w in waits) and waits[1] >= 0.05  # a lower bound: sleep never returns early


def test_the_logged_window_splits_wall_time_into_steps_and_data_wait():
    from pipelines.training.hooks.progress import WindowTimes

    w = WindowTimes()
    w.add(data_wait_s=0.1, step_s=0.3, images=8)
    w.add(data_wait_s=0.3, step_s=0.3, images=8)
    got = w.summary()
    assert got["images_per_s"] == pytest.approx(16 / 1.0)  # every image over wait + step time
    assert got["step_s"] == pytest.approx(0.3) and got["data_wait_s"] == pytest.approx(0.2)
    assert got["input_bound_fraction"] == pytest.approx(0.4)
    assert WindowTimes().summary()["input_bound_fraction"] == 0.0
