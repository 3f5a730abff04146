"""The training step on the device: no host reads between sync steps, the device LR,
masked non-finite updates, the compiled step, and the whole-epoch augmentation."""

from pathlib import Path

import pytest
import torch

from cifar_ddp.config import AugmentConfig, ModelConfig, TrainConfig
from cifar_ddp.data import ChannelStats
from cifar_ddp.data import loaders
from cifar_ddp.data.loaders import TrainBatches
from cifar_ddp.data.sources import ImageSplit
from cifar_ddp.ema import WeightEma
from cifar_ddp.engine import SyncPlan
from cifar_ddp.errors import UserError
from cifar_ddp.models import build_model
from cifar_ddp.optim import build_optimizer
from cifar_ddp.step import TrainStep, capture_stream, resolve_step_options

from conftest import train_in_process

CPU = torch.device("cpu")
STATS = ChannelStats(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))


def batch(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def make_step(model, **train):
    cfg = TrainConfig(**{"label_smoothing": 0.0, "weight_decay": 5e-4, **train})
    optimizer = build_optimizer(model, cfg, 0.1)
    return TrainStep(model, optimizer, cfg, "fp32", CPU, first_step=0), optimizer


def snapshot(model, optimizer):
    """Weights, and every tensor of the optimizer's state (momentum; AdamW's moments and step)."""
    return ([p.detach().clone() for p in model.parameters()],
            [t.clone() for p in model.parameters() for t in optimizer.state[p].values()])


# ------------------------------------------------------------------ host syncs

SYNCING = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy")


def test_steady_state_steps_read_nothing_back_from_the_device(tmp_path: Path, monkeypatch):
    """Every call that blocks the host on a GPU (item, bool, float, tolist, ...) is counted
    inside each step; the only reads happen in TrainStep.read, at the plan's sync steps."""
    counts = {"step": [], "read_at": []}
    inside = {"now": False, "n": 0}
    for name in SYNCING:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, **kwargs):
            if inside["now"]:
                inside["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    real_call, real_read, real_lr = TrainStep.__call__, TrainStep.read, TrainStep.set_lr

    def call(self, images, labels):
        inside["now"], inside["n"] = True, 0
        try:
            real_call(self, images, labels)
        finally:
            inside["now"] = False
        counts["step"].append(inside["n"])

    def set_lr(self, lr):
        inside["now"], inside["n"] = True, 0
        real_lr(self, lr)
        inside["now"] = False
        assert inside["n"] == 0, "setting the LR read the device"

    def read(self):
        counts["read_at"].append(len(counts["step"]))
        return real_read(self)

    monkeypatch.setattr(TrainStep, "__call__", call)
    monkeypatch.setattr(TrainStep, "set_lr", set_lr)
    monkeypatch.setattr(TrainStep, "read", read)
    # 96 images, batch 16: 6 steps per epoch, 3 epochs; with EMA and the skip mode's masking.
    train_in_process(tmp_path / "run", **{"train.epochs": 3, "train.log_every_steps": 4, "train.ema_decay": 0.9,
                                          "train.on_nonfinite": "skip"})
    assert len(counts["step"]) == 18
    assert counts["step"] == [0] * 18
    # Reads at multiples of 4 and at each epoch's end (steps 6, 12, 18), nowhere else.
    assert counts["read_at"] == [4, 6, 8, 12, 16, 18]


def test_sync_plan_names_every_kind_of_sync_step():
    plan = SyncPlan(every=50, checkpoint_every=8, stop_after=13)
    assert [s for s in range(1, 60) if plan.due(s)] == [8, 13, 16, 24, 32, 40, 48, 50, 56]


# ------------------------------------------------------------------ the update


def test_device_lr_drives_the_fused_update_like_plain_sgd():
    """Two steps at two learning rates, against torch's reference SGD (foreach, float LR)."""
    model = tiny_model()
    step, _ = make_step(model)
    reference = tiny_model()
    ref_opt = torch.optim.SGD([{"params": [p for p in reference.parameters() if p.ndim > 1], "weight_decay": 5e-4},
                               {"params": [p for p in reference.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                              lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    for lr, seed in ((0.05, 1), (0.2, 2)):
        images, labels = batch(seed)
        step.set_lr(lr)
        step(images, labels)
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(images), labels).backward()
        ref_opt.step()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_nonfinite_step_is_masked_on_the_device_and_reported_at_the_read(optimizer_name):
    model = tiny_model()
    ema = WeightEma(model, 0.9)
    cfg = TrainConfig(label_smoothing=0.0, optimizer=optimizer_name)
    optimizer = build_optimizer(model, cfg, 0.1)
    step = TrainStep(model, optimizer, cfg, "fp32", CPU, first_step=10, ema=ema)
    step.set_lr(0.1)
    step(*batch(1))                                   # step 11: fine
    weights, momenta = snapshot(model, optimizer)
    ema_before = [t.clone() for t in ema.module.parameters()]
    images, labels = batch(2)
    images[0, 0, 0, 0] = float("nan")
    step(images, labels)                              # step 12: NaN everywhere downstream
    after_weights, after_momenta = snapshot(model, optimizer)
    for before, after in zip(weights + momenta, after_weights + after_momenta):
        assert torch.equal(before, after)
    for before, after in zip(ema_before, ema.module.parameters()):
        assert torch.equal(before, after)
    step(*batch(3))                                   # step 13: training goes on
    assert not torch.equal(weights[0], model[0].weight)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    report = step.read()
    assert report["nonfinite_steps"] == 1 and report["first_nonfinite_step"] == 12
    # Metrics leave the masked step out; the counters restart after a read.
    assert int(step.metrics()[2]) == 32
    assert step.read()["nonfinite_steps"] == 0


def test_compiled_step_matches_eager():
    """torch.compile (inductor, on this CPU) against eager, from the same weights: the same
    first loss, the same first update and losses that stay together, within the tolerances
    below. They are loose because eager fp32 convolution backward on CPU (oneDNN) is itself
    ~1e-2 off a float64 reference here, while the compiled one is ~1e-5 off. Without dropout:
    compiled code draws its random numbers its own way."""
    losses, update = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(dropout=0.0)).to(memory_format=torch.channels_last)
        initial = torch.cat([p.detach().flatten() for p in model.parameters()])
        step, _ = make_step(model, compile=compiled)
        losses[compiled] = []
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            images = torch.randn(32, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
            step.set_lr(0.05)
            step(images, torch.randint(0, 10, (32,), generator=g))
            losses[compiled].append(step.read()["loss"])
            if seed == 0:
                update[compiled] = torch.cat([p.detach().flatten() for p in model.parameters()]) - initial
        if compiled:
            assert step.setup_seconds > 0, "compiling was not timed apart"
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5)
    assert (update[True] - update[False]).norm() < 2e-2 * update[False].norm()
    # A missing or different update moves the next losses by far more than this.
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)


def test_the_first_step_is_timed_as_set_up_and_later_ones_are_not(monkeypatch):
    """The first step of a process pays one-time costs (on a GPU: loading cuDNN and
    autotuning every convolution, ~9 s on an H200), which belong to set-up, not to epoch 1.
    The clock is faked so that each step 'takes' 1 s: exactly one second is set-up."""
    clock = iter(range(0, 1000, 1))
    monkeypatch.setattr("cifar_ddp.step.time.perf_counter", lambda: float(next(clock)))
    step, _ = make_step(tiny_model())
    for seed in range(3):
        step.set_lr(0.1)
        step(*batch(seed))
    assert step.setup_seconds == 1.0


# ------------------------------------------------------------------ whole-epoch augmentation


def test_epoch_augmentation_ignores_chunking_and_resumes_at_its_step(monkeypatch):
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8).numpy()
    split = ImageSplit(images, (torch.arange(40) % 10).numpy())
    cfg = AugmentConfig(crop_p=0.5)

    def epoch(chunk: int, start_step: int = 0):
        monkeypatch.setattr(loaders, "AUGMENT_CHUNK", chunk)
        batches = TrainBatches(split, cfg, STATS, batch_size=8, rank=0, world_size=1, seed=3, device=CPU)
        batches.set_epoch(2)
        return list(batches.iterate(start_step))

    whole, chunked, resumed = epoch(8192), epoch(7), epoch(8192, start_step=3)
    assert len(whole) == 5 and len(resumed) == 2
    for (a, la), (b, lb) in zip(whole, chunked):
        assert torch.equal(a, b) and torch.equal(la, lb)
    for (a, la), (b, lb) in zip(whole[3:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)
    # And it is the batched augmentation itself, applied to the epoch's images in sampler order.
    batches = TrainBatches(split, cfg, STATS, batch_size=8, rank=0, world_size=1, seed=3, device=CPU)
    batches.set_epoch(2)
    order = torch.tensor(list(iter(batches.sampler)))
    gen = torch.Generator().manual_seed(loaders.epoch_seed(3, 0, 2))
    expected = batches.batch_augment(torch.from_numpy(images)[order], gen)
    assert torch.equal(torch.cat([b for b, _ in whole]), expected)


def test_the_step_itself_refuses_a_captured_step_on_cpu():
    # Not only the trainer: the benchmarks and lr_find build TrainStep directly.
    with pytest.raises(UserError, match="train.cuda_graph=true needs a CUDA GPU"):
        make_step(tiny_model(), cuda_graph=True)


@pytest.mark.parametrize("device, precision, captured", [
    ("cpu", "fp32", False), ("cpu", "bf16", False),
    ("cuda", "bf16", True), ("cuda", "fp32", True),
    ("cuda", "fp16", False),                         # GradScaler cannot be captured
])
def test_cuda_graph_auto_is_settled_for_the_device(device, precision, captured):
    resolved = resolve_step_options(TrainConfig(cuda_graph="auto"), torch.device(device), precision)
    assert resolved.cuda_graph is captured
    # An explicit choice is never changed, only checked.
    assert resolve_step_options(TrainConfig(cuda_graph=False), torch.device(device), precision).cuda_graph is False


def test_an_unsettled_auto_is_refused_where_a_bool_is_needed():
    with pytest.raises(ValueError, match="resolve_step_options"):
        capture_stream(TrainConfig(cuda_graph="auto"), CPU)


def test_cuda_graph_auto_trains_eagerly_on_cpu(tmp_path: Path):
    # The same run as cuda_graph=false, bit for bit; the saved config keeps "auto" as given,
    # so the run resumes as well on a GPU; the log says what this device did.
    auto = train_in_process(tmp_path / "auto", **{"train.cuda_graph": "auto"})
    eager = train_in_process(tmp_path / "eager", **{"train.cuda_graph": "false"})
    assert auto["replica_digests"] == eager["replica_digests"]
    assert '"cuda_graph": "auto"' in (tmp_path / "auto" / "config.json").read_text()
    assert "- cuda graph: False" in (tmp_path / "auto" / "training_log.md").read_text()


def test_an_infinite_gradient_is_masked_like_a_nan():
    """+inf (not NaN) in one gradient entry: the norm is inf, the update must not be applied."""
    model = tiny_model()
    step, optimizer = make_step(model)
    step.set_lr(0.1)
    step(*batch(1))
    weights, momenta = snapshot(model, optimizer)

    def poison(grad):
        grad = grad.clone()
        grad[0, 0] = float("inf")
        return grad

    handle = model[5].weight.register_hook(poison)
    step(*batch(2))
    handle.remove()
    after_weights, after_momenta = snapshot(model, optimizer)
    for before, after in zip(weights + momenta, after_weights + after_momenta):
        assert torch.equal(before, after)
    report = step.read()
    assert report["nonfinite_steps"] == 1 and report["first_nonfinite_step"] == 2


def test_two_nonfinite_steps_in_a_row_report_the_first_of_them():
    model = tiny_model()
    step, _ = make_step(model)
    step.set_lr(0.1)
    step(*batch(1))                                   # step 1: fine
    for seed in (2, 3):                               # steps 2 and 3: NaN
        images, labels = batch(seed)
        images[0, 0, 0, 0] = float("nan")
        step(images, labels)
    step(*batch(4))                                   # step 4: fine
    report = step.read()
    assert report["nonfinite_steps"] == 2 and report["first_nonfinite_step"] == 2
    assert int(step.metrics()[2]) == 32               # only steps 1 and 4 counted
