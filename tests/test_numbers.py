"""The numbers training runs on: the LR schedule, the loss, BN averaging over ranks, and
the albumentations ranges. Each test pins a value a plausible bug would change."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cifar_ddp.config import AugmentConfig, TrainConfig
from cifar_ddp.data import ChannelStats, albumentations_train
from cifar_ddp.distributed import DistContext
from cifar_ddp.optim import build_optimizer, lr_at, peak_lr
from cifar_ddp.step import TrainStep

STATS = ChannelStats(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


def test_onecycle_schedule_points():
    cfg = TrainConfig(warmup_frac=0.2, initial_div=25.0, final_div=1e4)
    peak = 0.8
    start, end = peak / 25.0, peak / 1e4
    assert lr_at(0.0, cfg, peak) == pytest.approx(start)
    assert lr_at(0.1, cfg, peak) == pytest.approx((start + peak) / 2)       # linear warm-up, half-way
    assert lr_at(0.2, cfg, peak) == pytest.approx(peak)
    assert lr_at(0.6, cfg, peak) == pytest.approx((peak + end) / 2)         # cosine, half-way down
    assert lr_at(1.0, cfg, peak) == pytest.approx(end)
    assert lr_at(1.5, cfg, peak) == pytest.approx(end)                      # clamped
    assert lr_at(0.5, TrainConfig(schedule="constant"), peak) == peak


def test_linear_scaling_of_the_peak_lr():
    cfg = TrainConfig(lr=0.4, lr_reference_batch=256)
    assert peak_lr(cfg, 512) == pytest.approx(0.8)
    assert peak_lr(cfg, 128) == pytest.approx(0.2)


def test_training_loss_uses_the_configured_label_smoothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    cfg = TrainConfig(label_smoothing=0.3)
    step = TrainStep(model, build_optimizer(model, cfg, 0.1), cfg, "fp32", torch.device("cpu"), first_step=0)
    images, labels = torch.randn(8, 3, 2, 2), torch.randint(0, 10, (8,))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=0.3).item()
        plain = torch.nn.functional.cross_entropy(model(images), labels).item()
    step.set_lr(0.1)
    step(images, labels)
    assert step.read()["loss"] == pytest.approx(expected, rel=1e-6)
    assert abs(expected - plain) > 1e-3


def _average_on_rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        bn = torch.nn.BatchNorm1d(3)
        bn.running_mean.fill_(rank + 1.0)            # rank 0: 1, rank 1: 2
        bn.num_batches_tracked.fill_(10 + rank)      # integer counters are left alone
        ctx = DistContext(rank=rank, world_size=2, backend="gloo")
        ctx.average_buffers(bn)
        results[rank] = (bn.running_mean.tolist(), int(bn.num_batches_tracked))
        # The other collectives, in the same job: element-wise max and sum, and the gather.
        mine = torch.tensor([rank + 1.0, 5.0 - rank])
        results[("ops", rank)] = (ctx.max(mine).tolist(), ctx.sum(mine).tolist(), mine.tolist(),
                                  ctx.gather_objects(f"r{rank}"))
    finally:
        torch.distributed.destroy_process_group()


def test_bn_buffers_are_averaged_over_ranks_not_summed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_average_on_rank, args=(port, results), nprocs=2, join=True)
    assert results[0] == ([1.5, 1.5, 1.5], 10) and results[1] == ([1.5, 1.5, 1.5], 11)
    for rank in (0, 1):   # max and sum of [1, 5] and [2, 4]; the caller's tensor untouched
        assert results[("ops", rank)] == ([2.0, 5.0], [3.0, 9.0], [rank + 1.0, 5.0 - rank], ["r0", "r1"])


def test_albumentations_ranges_follow_the_config():
    cfg = AugmentConfig(rotate_limit=10.0, shift_limit=0.05, scale_limit=0.2)
    affine = next(t for t in albumentations_train(cfg, STATS).transforms if type(t).__name__ == "Affine")
    assert tuple(affine.rotate) == (-10.0, 10.0)
    assert tuple(affine.scale["x"]) == pytest.approx((0.8, 1.2))
    assert tuple(affine.translate_percent["x"]) == pytest.approx((-0.05, 0.05))


def test_the_three_schedules_differ_where_they_should():
    """Hand-worked values: onecycle warms up linearly over warmup_frac then falls by a cosine;
    cosine starts at the peak (no warm-up) and falls by a cosine over the whole run; constant
    stays at the peak."""
    peak, end, start = 0.8, 0.8 / 1e4, 0.8 / 25.0
    common = dict(warmup_frac=0.25, initial_div=25.0, final_div=1e4)
    onecycle = TrainConfig(schedule="onecycle", **common)
    cosine = TrainConfig(schedule="cosine", **common)
    constant = TrainConfig(schedule="constant", **common)
    half_cos = lambda f: end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * f))  # noqa: E731
    expected = {
        #  progress: (onecycle, cosine, constant)
        0.0: (start, peak, peak),
        0.125: ((start + peak) / 2, half_cos(0.125), peak),
        0.25: (peak, half_cos(0.25), peak),
        0.5: (half_cos(1 / 3), (peak + end) / 2, peak),
        0.75: (half_cos(2 / 3), half_cos(0.75), peak),
        1.0: (end, end, peak),
    }
    for progress, (one, cos, flat) in expected.items():
        assert lr_at(progress, onecycle, peak) == pytest.approx(one, rel=1e-12), progress
        assert lr_at(progress, cosine, peak) == pytest.approx(cos, rel=1e-12), progress
        assert lr_at(progress, constant, peak) == pytest.approx(flat, rel=1e-12), progress
    # cosine falls monotonically from the very first step; onecycle still rises there.
    points = [i / 100 for i in range(101)]
    cos_values = [lr_at(p, cosine, peak) for p in points]
    assert all(a > b for a, b in zip(cos_values, cos_values[1:]))
    assert lr_at(0.01, onecycle, peak) > lr_at(0.0, onecycle, peak)
