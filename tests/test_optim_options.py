"""airbench's optimisation options and gradient clipping, by hand: clipping inside the step
equals torch.nn.utils.clip_grad_norm_ (fp32, and fp16 through a GradScaler), the BN-bias
learning rate multiplier, frozen BN gains, model.bn_momentum, and the alternating flip."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_ddp.config import AugmentConfig, ModelConfig, TrainConfig, config_from_dict
from cifar_ddp.data import ChannelStats
from cifar_ddp.data.loaders import TrainBatches
from cifar_ddp.data.sources import ImageSplit
from cifar_ddp.data.transforms import alternate_flips, normalize_batch
from cifar_ddp.errors import ConfigError
from cifar_ddp.models import build_model
from cifar_ddp.optim import build_optimizer
from cifar_ddp.step import TrainStep

from conftest import REPO

CPU = torch.device("cpu")
STATS = ChannelStats(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
EXAMPLE = f"{REPO}/examples/tiny_net.py:TinyNet"


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def batch(n: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g) * 3, torch.randint(0, 10, (n,), generator=g)


def reference_grads(model: nn.Module, images, labels, max_norm: float, scale: float = 1.0):
    """What torch.nn.utils.clip_grad_norm_ leaves after a plain backward of the same loss."""
    model = copy.deepcopy(model)
    loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
    (loss * scale).backward()
    for p in model.parameters():
        p.grad.div_(scale)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return [p.grad.clone() for p in model.parameters()], float(norm)


@pytest.mark.parametrize("max_norm", [0.05, 1e6])   # clips / leaves alone (the factor is capped at 1)
def test_clipping_in_the_step_equals_clip_grad_norm(max_norm):
    model, (images, labels) = tiny_model(), batch()
    expected, norm = reference_grads(model, images, labels, max_norm)
    assert (norm > max_norm) == (max_norm < 1)   # the small limit really clips
    cfg = TrainConfig(clip_grad_norm=max_norm)
    step = TrainStep(model, build_optimizer(model, cfg, 0.1), cfg, "fp32", CPU, first_step=0)
    step(images, labels)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-6)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert abs(float(total) - min(norm, max_norm)) < 1e-4 * max(1.0, min(norm, max_norm))


def test_clipping_with_a_grad_scaler_unscales_first():
    """fp16's path: the gradients are scaled by 2**10 during backward; the limit applies to
    the true gradients (a clip of the scaled ones would leave them 1024x too small)."""
    model, (images, labels) = tiny_model(), batch()
    expected, _ = reference_grads(model, images, labels, 0.05)
    cfg = TrainConfig(clip_grad_norm=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    step = TrainStep(model, build_optimizer(model, cfg, 0.1), cfg, "fp32", CPU, first_step=0, scaler=scaler)
    step(images, labels)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-6)


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def test_bn_bias_lr_multiplier_groups_and_first_update_by_hand():
    model = bn_net()
    conv, bn, fc = model[0], model[1], model[5]
    cfg = TrainConfig(bn_bias_lr_mult=64.0, weight_decay=5e-4, momentum=0.9, nesterov=True, label_smoothing=0.0)
    optimizer = build_optimizer(model, cfg, 0.1)
    ids = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
    assert ids == [[id(conv.weight), id(fc.weight)], [id(conv.bias), id(bn.weight), id(fc.bias)], [id(bn.bias)]]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0, 0.0]
    step = TrainStep(model, optimizer, cfg, "fp32", CPU, first_step=0)
    step.set_lr(0.1)
    assert [float(g["lr"]) for g in optimizer.param_groups] == pytest.approx([0.1, 0.1, 6.4], rel=1e-7)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step(*batch())
    # First SGD step, momentum buffer 0 -> buffer = g; Nesterov: update = lr * (1 + m) * g.
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, lr in (("1.bias", 6.4), ("0.bias", 0.1), ("1.weight", 0.1)):
        expected = before[name] - lr * 1.9 * grads[name]
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), expected, rtol=1e-6, atol=1e-7)
    # Without the multiplier: the two groups of before, one LR tensor for both.
    plain = build_optimizer(bn_net(), TrainConfig(), 0.1)
    assert len(plain.param_groups) == 2


def test_frozen_bn_gains_stay_put_and_leave_the_optimizer():
    model = bn_net()
    bn = model[1]
    with torch.no_grad():
        bn.weight.fill_(1.0)
    cfg = TrainConfig(bn_freeze_weight=True)
    optimizer = build_optimizer(model, cfg, 0.1)
    assert not bn.weight.requires_grad
    assert all(p is not bn.weight for g in optimizer.param_groups for p in g["params"])
    step = TrainStep(model, optimizer, cfg, "fp32", CPU, first_step=0)
    bias = bn.bias.detach().clone()
    for _ in range(3):
        step.set_lr(0.1)
        step(*batch())
    assert torch.equal(bn.weight.detach(), torch.ones(4)) and bn.weight.grad is None
    assert not torch.equal(bn.bias.detach(), bias)     # the rest still trains


def test_freezing_gains_refuses_zero_init_residual():
    with pytest.raises(ConfigError, match="bn_freeze_weight.*zero_init_residual"):
        config_from_dict({"train": {"bn_freeze_weight": True}, "model": {"name": "sep_resnet",
                                                                          "zero_init_residual": True}})


@pytest.mark.parametrize("name", ["seed", "sep_resnet", EXAMPLE])
def test_bn_momentum_reaches_every_batchnorm_and_weights_the_new_batch(name):
    model = build_model(ModelConfig(name=name, bn_momentum=0.4))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.momentum == 0.4 for m in norms)
    assert all(m.momentum == 0.1 for m in build_model(ModelConfig(name=name)).modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    # PyTorch's sense: running = (1 - m) * running + m * batch mean.
    bn = norms[0]
    x = torch.randn(8, bn.num_features, 4, 4) + 3.0
    bn.train()
    bn(x)
    torch.testing.assert_close(bn.running_mean, 0.4 * x.mean((0, 2, 3)))


def test_bn_momentum_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match="model.bn_momentum"):
        config_from_dict({"model": {"bn_momentum": 1.5}})


# ------------------------------------------------------------------ alternating flip

def test_alternate_flips_the_complement_on_the_next_epoch_whatever_the_order():
    size = 101
    indices = torch.arange(size)
    flips = [alternate_flips(indices, e, seed=3, size=size) for e in range(4)]
    assert int(flips[0].sum()) == size // 2
    assert torch.equal(flips[1], ~flips[0]) and torch.equal(flips[2], flips[0]) and torch.equal(flips[3], ~flips[2])
    order = torch.randperm(size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(alternate_flips(order, 1, 3, size), flips[1][order])
    assert not torch.equal(alternate_flips(indices, 0, seed=4, size=size), flips[0])


def test_the_epoch_pipeline_flips_each_image_on_alternate_epochs_on_any_rank():
    rng = np.random.default_rng(0)
    data = ImageSplit(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64))
    cfg = AugmentConfig(flip="alternate", affine_p=0.0, cutout_p=0.0)
    plain = normalize_batch(torch.from_numpy(data.images), STATS)

    def flipped_by_index(rank: int, world: int, epoch: int):
        batches = TrainBatches(data, cfg, STATS, 8, rank, world, 5, CPU)
        batches.set_epoch(epoch)
        indices = batches._indices()
        images = torch.cat([x for x, _ in batches.iterate()])
        flipped = {}
        for i, image in zip(indices.tolist(), images):
            assert torch.equal(image, plain[i]) or torch.equal(image, plain[i].flip(2))
            flipped[i] = torch.equal(image, plain[i].flip(2)) and not torch.equal(image, plain[i])
        return flipped

    one = [flipped_by_index(0, 1, e) for e in (2, 3)]
    assert set(one[0]) == set(one[1]) == set(range(64))
    assert all(one[0][i] != one[1][i] for i in range(64)) and sum(one[0].values()) == 32
    for rank in (0, 1):   # two processes flip each of their images as one process does
        shard = flipped_by_index(rank, 2, 2)
        assert shard and all(one[0][i] == f for i, f in shard.items())


def test_alternate_flip_settings_are_checked():
    with pytest.raises(ConfigError, match="hflip_p"):
        config_from_dict({"augment": {"flip": "alternate", "hflip_p": 0.3}})
    with pytest.raises(ConfigError, match="augment.backend=tensor"):
        config_from_dict({"augment": {"flip": "alternate", "backend": "albumentations"}})


SYNCING = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy")


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_clipping_multiplied_lrs_and_soft_targets_read_nothing_back(monkeypatch, optimizer):
    """Every host read (item, bool, float, ...) inside the step is counted: with clipping,
    a BN-bias LR group and mixed (soft) targets, under SGD and under Muon + SGD, there are
    none, as without them."""
    model = bn_net()
    cfg = TrainConfig(clip_grad_norm=0.1, bn_bias_lr_mult=64.0, optimizer=optimizer)
    step = TrainStep(model, build_optimizer(model, cfg, 0.1), cfg, "fp32", CPU, first_step=0)
    images, labels = batch()
    soft = 0.7 * F.one_hot(labels, 10).float() + 0.3 * F.one_hot(labels.roll(1), 10).float()
    step(images, soft)   # the first step may initialise lazily
    reads = []
    for name in SYNCING:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name, **k: (reads.append(_n),
                                                                                         _real(self, *a, **k))[1])
    for _ in range(3):
        step.set_lr(0.05)
        step(images, soft)
    monkeypatch.undo()
    assert reads == []


# ------------------------------------------------------------------ Muon + SGD

def separable_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False),   # depthwise
                         nn.Conv2d(8, 12, 1, bias=True), nn.BatchNorm2d(12), nn.ReLU(),      # pointwise
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))


def test_muon_takes_dense_and_pointwise_convs_and_leaves_depthwise_to_sgd():
    from cifar_ddp.optim import MuonWithSGD, muon_weights

    model = build_model(ModelConfig(name="sep_resnet"))
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), 0.1)
    assert isinstance(optimizer, MuonWithSGD)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = {id(m.weight) for m in convs if m.groups > 1}
    dense = {id(m.weight) for m in convs if m.groups == 1}
    assert depthwise and dense
    assert {id(w) for w in muon_weights(model)} == dense == {id(w) for w in optimizer.muon_group["params"]}
    in_sgd = [id(p) for g in optimizer.sgd.param_groups for p in g["params"]]
    assert depthwise <= set(in_sgd) and not dense & set(in_sgd)
    # Every trainable parameter is stepped by exactly one of the two.
    assert sorted(in_sgd + list(dense)) == sorted(id(p) for p in model.parameters())
    assert all(m.dim() == 2 for m in optimizer.matrices)


def test_muon_steps_equal_the_two_optimizers_called_by_hand():
    model = separable_net()
    reference = copy.deepcopy(model)
    cfg = TrainConfig(optimizer="muon", muon_lr=0.05, muon_momentum=0.9, label_smoothing=0.0, weight_decay=5e-4)
    step = TrainStep(model, build_optimizer(model, cfg, 0.1), cfg, "fp32", CPU, first_step=0)

    ref_convs = [reference[0].weight, reference[4].weight]
    matrices = [nn.Parameter(w.detach().view(w.shape[0], -1)) for w in ref_convs]
    others = [p for p in reference.parameters() if all(p is not w for w in ref_convs)]
    decayed = [p for p in others if p.ndim > 1]
    sgd = torch.optim.SGD([{"params": decayed, "weight_decay": 5e-4},
                           {"params": [p for p in others if p.ndim <= 1], "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True)
    muon = torch.optim.Muon(matrices, lr=0.05, weight_decay=5e-4, momentum=0.9, nesterov=True)
    for seed in range(2):   # the second step uses both momentum buffers
        images, labels = batch()
        images = images + seed
        step.set_lr(0.1)
        step(images, labels)
        reference.zero_grad()
        F.cross_entropy(reference(images), labels).backward()
        for w, m in zip(ref_convs, matrices):
            m.grad = w.grad.view(m.shape)
        sgd.step()
        muon.step()
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert (p - q).abs().max() <= 1e-6, (seed, name, float((p - q).abs().max()), float(p.abs().max()))


def test_a_non_finite_muon_step_changes_no_weight_and_no_momentum():
    model = separable_net()
    cfg = TrainConfig(optimizer="muon", on_nonfinite="skip")
    optimizer = build_optimizer(model, cfg, 0.1)
    step = TrainStep(model, optimizer, cfg, "fp32", CPU, first_step=0)
    images, labels = batch()
    step.set_lr(0.1)
    step(images, labels)
    weights = [p.detach().clone() for p in model.parameters()]
    buffers = [optimizer.muon.state[m]["momentum_buffer"].clone() for m in optimizer.matrices]
    step(images * float("inf"), labels)
    assert step.read()["nonfinite_steps"] == 1
    assert all(torch.equal(p.detach(), w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(optimizer.muon.state[m]["momentum_buffer"], b) for m, b in zip(optimizer.matrices, buffers))


def test_muon_state_survives_a_checkpoint_round_trip():
    model = separable_net()
    cfg = TrainConfig(optimizer="muon")
    optimizer = build_optimizer(model, cfg, 0.1)
    step = TrainStep(model, optimizer, cfg, "fp32", CPU, first_step=0)
    step.set_lr(0.1)
    step(*batch())
    again = build_optimizer(copy.deepcopy(model), cfg, 0.1)
    again.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for m, n in zip(optimizer.matrices, again.matrices):
        assert torch.equal(optimizer.muon.state[m]["momentum_buffer"], again.muon.state[n]["momentum_buffer"])
    assert len(again.sgd.state) == len(optimizer.sgd.state)


def test_muon_under_a_grad_scaler_steps_as_without_one():
    """fp16's path: the GradScaler unscales each weight's gradient (the 2-D views get theirs
    only inside the step) and then steps both optimizers; 2**10 scales exactly."""
    model = separable_net()
    scaled_model = copy.deepcopy(model)
    cfg = TrainConfig(optimizer="muon")
    plain = TrainStep(model, build_optimizer(model, cfg, 0.1), cfg, "fp32", CPU, first_step=0)
    scaled = TrainStep(scaled_model, build_optimizer(scaled_model, cfg, 0.1), cfg, "fp32", CPU, first_step=0,
                       scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    for step in (plain, scaled):
        for _ in range(2):
            step.set_lr(0.1)
            step(*batch())
    for p, q in zip(model.parameters(), scaled_model.parameters()):
        assert torch.equal(p.detach(), q.detach())


def test_muon_reaches_its_lr_at_the_schedules_peak_whatever_lr_the_optimizer_starts_at():
    """lr_find builds the optimizer at the sweep's first LR (1e-5), the trainer at the peak:
    either way Muon's LR is train.muon_lr when the step's LR is the peak, and follows it."""
    from cifar_ddp.assembly import build_optimization
    from cifar_ddp.distributed import DistContext

    cfg = TrainConfig(optimizer="muon", muon_lr=0.05, lr=0.4, batch_size=64)   # peak 0.4 * 64 / 256 = 0.1
    for start in (None, 1e-5):
        optimization = build_optimization(tiny_model(), cfg, "fp32", DistContext(), lr=start)
        assert optimization.peak_lr == pytest.approx(0.1)
        group = optimization.optimizer.muon_group
        assert group["lr_mult"] * optimization.peak_lr == pytest.approx(0.05)
        assert group["lr_mult"] * 1e-5 == pytest.approx(0.05 * 1e-4)        # at the sweep's first LR
