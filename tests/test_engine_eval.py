"""engine.evaluate's numbers against a direct computation in float64: the loss over the
whole split, flip-TTA, and the split indices of the most confident mistakes when a rank's
shard takes several batches. Fast: one process, playing rank r of W (without a process
group the sums and the gather are the identity, so one rank's shard is scored alone)."""

import copy

import numpy as np
import torch
import torch.nn.functional as F

from cifar_ddp.data.loaders import DeviceEvalSplit, eval_shard
from cifar_ddp.data.sources import ChannelStats, ImageSplit
from cifar_ddp.distributed import DistContext
from cifar_ddp.engine import evaluate

STATS = ChannelStats(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


def lopsided_model() -> torch.nn.Module:
    """Not mirror-symmetric (no global pooling: every position has its own weight)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 10))


def split(n: int = 23, seed: int = 0) -> ImageSplit:
    rng = np.random.default_rng(seed)
    return ImageSplit(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64))


def normalized(images: np.ndarray) -> torch.Tensor:
    """By hand, in float64: (pixel / 255 - mean) / std, NCHW."""
    x = torch.from_numpy(images).double().permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(STATS.mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
        torch.tensor(STATS.std, dtype=torch.float64).view(1, 3, 1, 1)


def run(model, data, ctx=DistContext(), **kwargs):
    return evaluate(model, data, STATS, ctx, "fp32", 10, channels_last=False, **kwargs)


def test_loss_is_the_mean_over_the_whole_split_with_an_odd_last_batch():
    model, data = lopsided_model(), split(23)
    result = run(model, data, batch_size=5)          # batches of 5, 5, 5, 5, 3
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(normalized(data.images))
    expected = F.cross_entropy(logits, torch.from_numpy(data.labels)).item()
    assert abs(result.loss - expected) < 1e-5
    assert result.total == 23
    assert result.correct == int((logits.argmax(1).numpy() == data.labels).sum())


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    model, data = lopsided_model(), split(23)

    class MirrorAverage(torch.nn.Module):
        def forward(self, x):
            return (model(x) + model(torch.flip(x, dims=[3]))) / 2   # dims=[3]: left-right

    tta = run(model, data, batch_size=7, tta_flip=True, keep_mistakes=23)
    reference = run(MirrorAverage(), data, batch_size=7, keep_mistakes=23)
    plain = run(model, data, batch_size=7)
    assert abs(tta.loss - reference.loss) < 1e-6 and tta.confusion == reference.confusion
    assert [m[1:] for m in tta.mistakes] == [m[1:] for m in reference.mistakes]
    assert abs(tta.loss - plain.loss) > 1e-3, "the toy model must not be mirror-symmetric"


def test_mistake_indices_on_a_later_rank_across_several_batches_point_at_the_right_images():
    model, data = lopsided_model(), split(41, seed=1)
    world, rank = 3, 1
    shard = eval_shard(data, rank, world)            # images 1, 4, 7, ...: 14 of them, in batches of 4
    result = run(model, shard, DistContext(rank=rank, world_size=world), batch_size=4, keep_mistakes=100)
    with torch.no_grad():
        probabilities = copy.deepcopy(model).double()(normalized(data.images)).softmax(1)
    confidence, predicted = probabilities.max(1)
    mine = [i for i in range(rank, len(data), world) if predicted[i] != data.labels[i]]
    assert len(mine) >= 5, "the toy model must make mistakes in several batches"
    assert sorted(i for _, i, _, _ in result.mistakes) == mine
    for c, i, t, p in result.mistakes:
        assert i % world == rank and t == data.labels[i] and p == predicted[i]
        assert abs(c - confidence[i].item()) < 1e-5
    # Most confident first.
    assert [m[0] for m in result.mistakes] == sorted((m[0] for m in result.mistakes), reverse=True)


def test_plain_and_flip_tta_accuracy_come_from_one_pass_and_equal_two_separate_ones():
    """with_tta_accuracy: the plain metrics and the flip-TTA accuracy in one evaluation, each
    equal to its own evaluation; playing rank 1 of 2 (14 images: batches of 4, 4, 4, 2). The
    labels are the float64 TTA predictions, so the TTA accuracy must be exactly 1 and an
    image paired with another's mirror would show."""
    model, data = lopsided_model(), split(29, seed=3)
    shard = eval_shard(data, 1, 2)
    with torch.no_grad():
        x = normalized(shard.images)
        reference = copy.deepcopy(model).double()
        shard = ImageSplit(shard.images, ((reference(x) + reference(x.flip(3))) / 2).argmax(1).numpy())
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    both = run(model, shard, batch_size=4, with_tta_accuracy=True)
    assert calls == [8, 8, 8, 4], "one forward per batch, the image and its mirror together"
    plain = run(model, shard, batch_size=4)
    tta = run(model, shard, batch_size=4, tta_flip=True)
    assert both.confusion == plain.confusion and abs(both.loss - plain.loss) < 1e-6
    assert both.accuracy == plain.accuracy < 1.0 and plain.accuracy_tta is None
    assert both.accuracy_tta == tta.accuracy == 1.0 and both.correct_tta == tta.correct == len(shard.labels)
    assert abs(both.loss_tta - tta.loss) < 1e-6 and abs(both.loss_tta - both.loss) > 1e-3


def test_a_split_kept_normalised_on_the_device_scores_exactly_as_the_uint8_one():
    """The trainer normalises its evaluation shard once (DeviceEvalSplit); every figure is the
    same as from the uint8 shard normalised batch by batch, TTA and mistakes included."""
    model, data = lopsided_model(), split(41, seed=2)
    shard = eval_shard(data, 1, 3)
    kept = DeviceEvalSplit(shard, STATS, torch.device("cpu"))
    assert torch.allclose(kept.images.double(), normalized(shard.images), atol=1e-6)
    for kwargs in ({}, {"with_tta_accuracy": True, "keep_mistakes": 5}):
        a = run(model, shard, batch_size=4, **kwargs)
        b = run(model, kept, batch_size=4, **kwargs)
        assert (a.loss, a.confusion, a.accuracy_tta, a.mistakes, a.calibration) == \
            (b.loss, b.confusion, b.accuracy_tta, b.mistakes, b.calibration)
