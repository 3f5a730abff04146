"""Mixup and CutMix (data/mixing.py): the same images and soft labels as torchvision's
MixUp / CutMix on the same draws, the soft-target loss with label smoothing against a
float64 hand computation, train accuracy against the dominant label, the ramp, and no
change at all when mixing is off."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from cifar_ddp.config import AugmentConfig, TrainConfig, config_from_dict
from cifar_ddp.data import ChannelStats
from cifar_ddp.data.loaders import TrainBatches, epoch_seed
from cifar_ddp.data.mixing import BatchMix, dominant_labels, ramp_factor
from cifar_ddp.data.sources import ImageSplit
from cifar_ddp.errors import ConfigError
from cifar_ddp.optim import build_optimizer
from cifar_ddp.step import TrainStep

CPU = torch.device("cpu")
STATS = ChannelStats(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
CLASSES = 10


def images_and_labels(n: int = 8, seed: int = 0, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def one_batch_params(lam: float, cutmix: bool, centre_y: int = 0, centre_x: int = 0, size: int = 32):
    params = BatchMix.boxes(np.array([lam]), np.array([cutmix]), np.array([centre_y]), np.array([centre_x]),
                            size, size)
    return BatchMix(AugmentConfig(), CLASSES).to_device(params, CPU)


def torchvision_mixup(images, labels, lam):
    mix = v2.MixUp(alpha=1.0, num_classes=CLASSES)
    mix._dist.sample = lambda shape=(): torch.tensor(lam)
    return mix(images, labels)


def torchvision_cutmix(images, labels, lam, centre_y, centre_x, monkeypatch):
    mix = v2.CutMix(alpha=1.0, num_classes=CLASSES)
    mix._dist.sample = lambda shape=(): torch.tensor(lam)
    drawn = iter([torch.tensor([centre_x]), torch.tensor([centre_y])])   # it draws x, then y
    with monkeypatch.context() as patch:
        patch.setattr(torch, "randint", lambda *args, **kwargs: next(drawn))
        return mix(images, labels)


@pytest.mark.parametrize("lam", [0.0, 0.23, 0.5, 0.91, 1.0])
def test_mixup_equals_torchvision_on_the_same_lam(lam):
    images, labels = images_and_labels()
    ours_x, ours_y = BatchMix(AugmentConfig(), CLASSES).apply(images, labels, one_batch_params(lam, False))
    theirs_x, theirs_y = torchvision_mixup(images, labels, lam)
    torch.testing.assert_close(ours_x, theirs_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_y, theirs_y, rtol=0, atol=1e-7)


@pytest.mark.parametrize("lam,centre_y,centre_x", [(0.3, 16, 16), (0.6, 0, 31), (0.05, 30, 2), (0.999, 7, 9),
                                                   (1.0, 5, 5), (0.0, 16, 0)])
def test_cutmix_equals_torchvision_on_the_same_lam_and_centre(lam, centre_y, centre_x, monkeypatch):
    images, labels = images_and_labels(seed=1)
    params = one_batch_params(lam, True, centre_y, centre_x)
    ours_x, ours_y = BatchMix(AugmentConfig(), CLASSES).apply(images, labels, params)
    theirs_x, theirs_y = torchvision_cutmix(images, labels, lam, centre_y, centre_x, monkeypatch)
    assert torch.equal(ours_x, theirs_x)           # a pasted box: a copy, exact
    torch.testing.assert_close(ours_y, theirs_y, rtol=0, atol=1e-7)


def test_cutmix_box_by_hand():
    # lam 0.75: half side floor(0.5 * sqrt(0.25) * 32) = 8; centre (20, 28): rows 12..27,
    # columns 20..31 (clipped at 32): 16 x 12 pixels, so lam becomes 1 - 192/1024.
    p = BatchMix.boxes(np.array([0.75]), np.array([True]), np.array([20]), np.array([28]), 32, 32)
    assert (p["top"][0], p["bottom"][0], p["left"][0], p["right"][0]) == (12, 28, 20, 32)
    assert p["lam"][0] == 1 - 192 / 1024


def test_each_batch_of_a_chunk_mixes_with_itself_by_its_own_method(monkeypatch):
    """Three batches of 4 in one call: mixup, CutMix, unmixed; each equals torchvision on that batch alone."""
    images, labels = images_and_labels(n=12, seed=2)
    params = BatchMix.boxes(np.array([0.4, 0.7, 1.0]), np.array([False, True, False]),
                            np.array([3, 17, 0]), np.array([9, 25, 0]), 32, 32)
    mixed, targets = BatchMix(AugmentConfig(), CLASSES).apply(
        images, labels, BatchMix(AugmentConfig(), CLASSES).to_device(params, CPU))
    expected = [torchvision_mixup(images[:4], labels[:4], 0.4),
                torchvision_cutmix(images[4:8], labels[4:8], 0.7, 17, 25, monkeypatch),
                (images[8:], F.one_hot(labels[8:], CLASSES).float())]
    for b, (x, y) in enumerate(expected):
        torch.testing.assert_close(mixed[4 * b:4 * b + 4], x, rtol=0, atol=1e-6)
        torch.testing.assert_close(targets[4 * b:4 * b + 4], y, rtol=0, atol=1e-7)
    assert torch.equal(mixed[8:], images[8:]) and torch.equal(targets[8:], F.one_hot(labels[8:], CLASSES).float())


def test_sample_branches_probabilities_and_ramp():
    draw = lambda cfg, epoch=9, seed=3: BatchMix(cfg, CLASSES).sample(4000, 32, 32, epoch, seed)  # noqa: E731
    only_mixup = draw(AugmentConfig(mixup_alpha=0.4))
    assert not only_mixup["cutmix"].any() and (only_mixup["bottom"] == only_mixup["top"]).all()
    assert (only_mixup["lam"] < 1).all()
    only_cutmix = draw(AugmentConfig(cutmix_alpha=1.0))
    assert only_cutmix["cutmix"].all()
    both = draw(AugmentConfig(mixup_alpha=0.4, cutmix_alpha=1.0, mix_switch_prob=0.25))
    assert abs(both["cutmix"].mean() - 0.25) < 0.03
    assert (draw(AugmentConfig(mixup_alpha=0.4, mix_prob=0.0))["lam"] == 1.0).all()
    sometimes = draw(AugmentConfig(cutmix_alpha=1.0, mix_prob=0.3))
    unmixed = ~sometimes["cutmix"]
    assert abs(sometimes["cutmix"].mean() - 0.3) < 0.03 and (sometimes["lam"][unmixed] == 1.0).all()
    # The ramp scales the partner's share: epoch 0 of 4 has a quarter of full strength.
    ramped, full = AugmentConfig(mixup_alpha=1.0, mix_ramp_epochs=4), AugmentConfig(mixup_alpha=1.0)
    np.testing.assert_allclose(1 - draw(ramped, epoch=0)["lam"], 0.25 * (1 - draw(full)["lam"]), rtol=1e-12)
    assert (1 - draw(ramped, epoch=0)["lam"]).max() <= 0.25
    assert [ramp_factor(ramped, e) for e in (0, 1, 3, 10)] == [0.25, 0.5, 1.0, 1.0]
    assert ramp_factor(full, 0) == 1.0
    # Beta(1, 1) is uniform: the mean share 1/2, the variance 1/12.
    assert abs(draw(full)["lam"].mean() - 0.5) < 0.02 and abs(draw(full)["lam"].var() - 1 / 12) < 0.01


def test_a_ramped_cutmix_box_covers_the_ramped_share():
    ramped = BatchMix(AugmentConfig(cutmix_alpha=1.0, mix_ramp_epochs=10), CLASSES).sample(2000, 32, 32, 0, 5)
    # The partner's share is at most a tenth; the box's (what lam ends as) is at most that.
    assert (1 - ramped["lam"]).max() <= 0.1 + 1e-12


def split(n: int = 96, seed: int = 0) -> ImageSplit:
    rng = np.random.default_rng(seed)
    return ImageSplit(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, CLASSES, n))


def epoch(cfg: AugmentConfig, data: ImageSplit, e: int = 1, start: int = 0, batch_size: int = 16):
    batches = TrainBatches(data, cfg, STATS, batch_size, 0, 1, 7, CPU, num_classes=CLASSES)
    batches.set_epoch(e)
    return list(batches.iterate(start)), batches


def test_the_epoch_pipeline_mixes_the_augmented_batches_as_drawn():
    """Mixing comes after augmentation and draws nothing from its generator: the mixed
    epoch is the unmixed one, mixed batch by batch as torchvision does with those draws."""
    data, cfg = split(), AugmentConfig(mixup_alpha=0.5, cutmix_alpha=1.0, mix_prob=0.8)
    mixed, batches = epoch(cfg, data)
    plain, _ = epoch(AugmentConfig(), data)
    draws = BatchMix(cfg, CLASSES).sample(batches.steps_per_epoch, 32, 32, 1, epoch_seed(7, 0, 1))
    assert draws["cutmix"].any() and (~draws["cutmix"] & (draws["lam"] < 1)).any() and (draws["lam"] == 1).any()
    for b, ((x, y), (x0, y0)) in enumerate(zip(mixed, plain)):
        lam = float(draws["lam"][b])
        if draws["cutmix"][b]:
            # The box itself is torchvision's (the tests above); here: pasted where drawn.
            expected = x0.clone()
            rows, cols = slice(draws["top"][b], draws["bottom"][b]), slice(draws["left"][b], draws["right"][b])
            expected[..., rows, cols] = x0.roll(1, 0)[..., rows, cols]
            hot = F.one_hot(y0, CLASSES).float()
            expected_y = hot.roll(1, 0) * (1 - lam) + hot * lam
        else:
            expected, expected_y = torchvision_mixup(x0, y0, lam)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(y, expected_y, rtol=0, atol=1e-7)


def test_a_resumed_epoch_mixes_the_same():
    data, cfg = split(), AugmentConfig(mixup_alpha=0.5, cutmix_alpha=1.0)
    whole, _ = epoch(cfg, data)
    resumed, _ = epoch(cfg, data, start=3)
    for (x, y), (rx, ry) in zip(whole[3:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_mixing_off_leaves_batches_exactly_as_before():
    """Off: hard int64 labels and the very same images. Never-mixing (mix_prob 0): the same
    images too, with one-hot targets. Plain epochs (augment=False) are never mixed."""
    data = split()
    off, _ = epoch(AugmentConfig(), data)
    never, _ = epoch(AugmentConfig(mixup_alpha=0.5, cutmix_alpha=1.0, mix_prob=0.0), data)
    indices = TrainBatches(data, AugmentConfig(), STATS, 16, 0, 1, 7, CPU)
    indices.set_epoch(1)
    order = indices._indices()
    for b, ((x, y), (nx, ny)) in enumerate(zip(off, never)):
        assert y.dtype == torch.int64 and y.ndim == 1
        assert torch.equal(y, torch.from_numpy(data.labels)[order[16 * b:16 * b + 16]])
        assert torch.equal(x, nx) and torch.equal(ny, F.one_hot(y, CLASSES).float())
    # Plain epochs under a mixing config: never mixed, but one-hot targets (the shape a
    # captured step was captured with), the same as the hard labels of a config without mixing.
    plain = TrainBatches(data, AugmentConfig(mixup_alpha=1.0), STATS, 16, 0, 1, 7, CPU, num_classes=CLASSES)
    unmixed = TrainBatches(data, AugmentConfig(), STATS, 16, 0, 1, 7, CPU)
    for batches in (plain, unmixed):
        batches.set_epoch(1, augment=False)
    for (x, y), (ux, uy) in zip(plain.iterate(), unmixed.iterate()):
        assert y.shape == (16, CLASSES) and torch.equal(y, F.one_hot(uy, CLASSES).float()) and torch.equal(x, ux)


def test_soft_target_loss_with_smoothing_and_dominant_accuracy_by_hand():
    """The step's loss on soft targets equals -sum q log softmax, q = (1 - e) t + e / C, in
    float64; train accuracy counts a hit against the larger share of each mixed image."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, CLASSES))
    g = torch.Generator().manual_seed(4)
    images = torch.randn(6, 3, 4, 4, generator=g)
    logits = model(images).detach()
    predicted = logits.argmax(1)
    # Rows 0-2: dominant share on the predicted class (hits); rows 3-5: the predicted class
    # only as the minor share (misses), whatever the prediction.
    other = (predicted + 1) % CLASSES
    lam = torch.tensor([0.7, 0.55, 1.0, 0.3, 0.45, 0.0]).view(6, 1)
    targets = lam * F.one_hot(predicted, CLASSES) + (1 - lam) * F.one_hot(other, CLASSES)
    smoothing = 0.1
    cfg = TrainConfig(label_smoothing=smoothing, weight_decay=0.0)
    step = TrainStep(model, build_optimizer(model, cfg, 0.1), cfg, "fp32", CPU, first_step=0)
    step(images, targets.float())
    q = (1 - smoothing) * targets.double() + smoothing / CLASSES
    expected = -(q * torch.log_softmax(logits.double(), 1)).sum(1).mean()
    loss_sum, correct, seen = step.metrics().tolist()
    assert math.isclose(step.read()["loss"], float(expected), rel_tol=1e-6)
    assert math.isclose(loss_sum, 6 * float(expected), rel_tol=1e-6)
    assert (correct, seen) == (3, 6)
    assert torch.equal(dominant_labels(targets), torch.where(lam.view(6) > 0.5, predicted, other))


@pytest.mark.parametrize("key,value,words", [
    ("augment.mixup_alpha", -0.1, ">= 0"), ("augment.mix_prob", 1.5, "[0, 1]"),
    ("augment.mix_switch_prob", -1, "[0, 1]"), ("augment.mix_ramp_epochs", -2, ">= 0"),
])
def test_bad_mixing_settings_name_the_key(key, value, words):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key}.*{words.replace('[', '.').replace(']', '.')}"):
        config_from_dict({section: {name: value}})


def test_mixing_needs_the_tensor_backend():
    with pytest.raises(ConfigError, match="augment.backend=tensor"):
        config_from_dict({"augment": {"cutmix_alpha": 1.0, "backend": "albumentations"}})


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_every_new_option_on_an_interrupted_run_resumes_bitwise(tmp_path, optimizer):
    """Mixup + CutMix with a ramp, the alternating flip, clipping, the BN-bias LR group with
    frozen gains and BN momentum, under SGD and Muon + SGD: stopped inside epoch 2 and
    resumed, the weights are bit for bit those of the straight run (the epoch's draws follow
    from (seed, rank, epoch); the optimizers' state travels in the checkpoint)."""
    from cifar_ddp import checkpoint as ckpt
    from cifar_ddp.trainer import Preempted

    from conftest import REPO, assert_bitwise_equal, final_weights, train_in_process

    settings = {"train.epochs": 3, "model.name": f"{REPO}/examples/tiny_net.py:TinyNet", "model.args.width": 8,
                "train.checkpoint_every_steps": 4, "augment.mixup_alpha": 0.4, "augment.cutmix_alpha": 1.0,
                "augment.mix_prob": 0.7, "augment.mix_ramp_epochs": 2, "augment.flip": "alternate",
                "train.clip_grad_norm": 0.5, "train.bn_bias_lr_mult": 16, "train.bn_freeze_weight": "true",
                "model.bn_momentum": 0.4, "train.optimizer": optimizer}
    straight = train_in_process(tmp_path / "straight", **settings)
    with pytest.raises(Preempted):
        train_in_process(tmp_path / "split", **settings, **{"train.stop_after_steps": 8})
    assert ckpt.load_file(ckpt.checkpoint_dir(tmp_path / "split") / "last.pt")["train_state"]["global_step"] == 8
    resumed = train_in_process(tmp_path / "split", **settings, **{"train.resume": "auto"})
    assert resumed["global_step"] == straight["global_step"] == 18
    assert_bitwise_equal(final_weights(tmp_path / "straight"), final_weights(tmp_path / "split"))
    assert resumed["train_accuracy"] == straight["train_accuracy"]


def test_mixing_in_chunks_changes_nothing(monkeypatch):
    from cifar_ddp.data import loaders

    data, cfg = split(), AugmentConfig(mixup_alpha=0.5, cutmix_alpha=1.0)
    whole, _ = epoch(cfg, data)
    monkeypatch.setattr(loaders, "AUGMENT_CHUNK", 64)   # 6 batches of 16: chunks of 4 and 2
    chunked, _ = epoch(cfg, data)
    assert all(torch.equal(x, cx) and torch.equal(y, cy) for (x, y), (cx, cy) in zip(whole, chunked))
