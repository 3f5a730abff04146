"""The device EMA of the weights, against a float64 reference of the same rule: the first
update copies, then keep = min(decay, (1 + n) / (10 + n)); skipped steps change nothing;
BN's running statistics are averaged like the weights and its counter is copied.

The lookahead (airbench's), against a float64 loop of its rule written here: every k steps
average = keep * average + (1 - keep) * model with keep = decay**k * (step / total)**3, then
model = average; the last step copies the average back; nothing happens in between; a
skipped step changes nothing; a resumed run continues the same sequence."""

from pathlib import Path

import pytest
import torch

from cifar_ddp.config import TrainConfig
from cifar_ddp.ema import Lookahead, WeightEma


def bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def train_forward(model: torch.nn.Module, seed: int) -> None:
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 4, generator=torch.Generator().manual_seed(seed)) * 3 + seed)


def test_the_first_update_copies_the_model():
    model = bn_model()
    ema = WeightEma(model, decay=0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)          # the EMA's copy holds the old weights: a copy must forget them
    train_forward(model, 1)
    ema.update(model)
    for mine, theirs in zip(ema.module.state_dict().values(), model.state_dict().values()):
        assert torch.equal(mine, theirs)
    assert int(ema.n_averaged) == 1


def test_a_skipped_update_changes_nothing_and_is_not_counted():
    model = bn_model()
    ema = WeightEma(model, decay=0.99)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    train_forward(model, 1)
    ema.update(model, skip=torch.tensor(True))
    assert int(ema.n_averaged) == 0
    for key, value in ema.state_dict().items():
        assert torch.equal(value, before[key]), key
    # The next real update is then the first: it copies.
    ema.update(model, skip=torch.tensor(False))
    assert int(ema.n_averaged) == 1
    assert torch.equal(ema.module[0].weight, model[0].weight)


def test_bn_statistics_are_averaged_and_the_counter_copied():
    model = bn_model()
    ema = WeightEma(model, decay=0.9)
    train_forward(model, 1)
    ema.update(model)                          # copies: the model's running mean, 1 batch tracked
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert int(ema.module[1].num_batches_tracked) == 1
    expected = model[1].running_mean.double().clone()
    train_forward(model, 2)
    ema.update(model)                          # n = 1: keep (1 + 1) / (10 + 1)
    keep = 2 / 11
    expected = keep * expected + (1 - keep) * model[1].running_mean.double()
    torch.testing.assert_close(ema.module[1].running_mean.double(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ema.module[1].running_mean, model[1].running_mean)
    assert int(ema.module[1].num_batches_tracked) == 2


# ------------------------------------------------------------------ lookahead

K, TOTAL, DECAY = 5, 12, 0.95
START = (0.5, -1.25, 2.0)


class ThreeWeights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(START))


def optimizer_delta(step: int) -> torch.Tensor:
    """What "the optimizer" adds at `step` (1-based): fixed, different every step, in float64."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(3, generator=g, dtype=torch.float64) * 0.3


def reference(skipped=()):
    """The lookahead's rule, step by step in float64: (model, average) after each step."""
    model, average = torch.tensor(START, dtype=torch.float64), torch.tensor(START, dtype=torch.float64)
    history = []
    for step in range(1, TOTAL + 1):
        if step not in skipped:
            model = model + optimizer_delta(step)
            if step % K == 0:
                keep = DECAY ** K * (step / TOTAL) ** 3
                average = keep * average + (1 - keep) * model
                model = average.clone()
        if step == TOTAL:   # the run ends on the average, its last step masked or not
            model = average.clone()
        history.append((model.clone(), average.clone()))
    return history


def run_lookahead(skipped=(), model=None, lookahead=None, steps=range(1, TOTAL + 1)):
    model = model if model is not None else ThreeWeights()
    lookahead = lookahead if lookahead is not None else Lookahead(model, K, DECAY, TOTAL)
    history = []
    for step in steps:
        skip = step in skipped
        with torch.no_grad():
            if not skip:
                model.w.add_(optimizer_delta(step).float())
        after_optimizer, average_before = model.w.detach().clone(), lookahead.module.w.clone()
        lookahead.update(model, torch.tensor(step), skip=torch.tensor(skip))
        history.append((step, after_optimizer, average_before, model.w.detach().clone(), lookahead.module.w.clone()))
    return history, model, lookahead


def test_lookahead_matches_the_float64_rule_over_12_steps():
    expected = reference()
    history, _, _ = run_lookahead()
    for (step, after_optimizer, average_before, model, average), (ref_model, ref_average) in zip(history, expected):
        torch.testing.assert_close(model.double(), ref_model, rtol=0, atol=1e-6, msg=f"model, step {step}")
        torch.testing.assert_close(average.double(), ref_average, rtol=0, atol=1e-6, msg=f"average, step {step}")
        if step in (K, 2 * K, TOTAL):
            # The model continues from the average: the very same values.
            assert torch.equal(model, average), step
        else:
            # In between, the model is what the optimizer made it, and the average does not move.
            assert torch.equal(model, after_optimizer) and torch.equal(average, average_before), step
        if step == TOTAL:
            assert torch.equal(average, average_before)   # 12 is off the beat: a copy back only
    # A hand-worked share: at step 5, keep = 0.7737809375 * 125/1728 = 0.05597374
    keep = 0.95 ** 5 * (5 / 12) ** 3
    assert keep == pytest.approx(0.05597374, abs=1e-8)
    moved = torch.tensor(START, dtype=torch.float64) + sum(optimizer_delta(s) for s in range(1, 6))
    torch.testing.assert_close(history[4][4].double(), keep * torch.tensor(START, dtype=torch.float64)
                               + (1 - keep) * moved, rtol=0, atol=1e-6)


def test_a_skipped_step_changes_nothing_even_on_the_beat():
    expected = reference(skipped=(5,))
    history, _, _ = run_lookahead(skipped=(5,))
    step, after_optimizer, average_before, model, average = history[4]
    assert step == 5 and torch.equal(model, after_optimizer) and torch.equal(average, average_before)
    assert not torch.equal(model, average)
    for (step, *_, model, average), (ref_model, ref_average) in zip(history, expected):
        torch.testing.assert_close(model.double(), ref_model, rtol=0, atol=1e-6, msg=f"model, step {step}")
        torch.testing.assert_close(average.double(), ref_average, rtol=0, atol=1e-6, msg=f"average, step {step}")
    assert torch.equal(history[9][3], history[9][4])    # step 10 fires as usual


def test_a_masked_last_step_still_ends_the_run_on_the_average():
    expected = reference(skipped=(TOTAL,))
    history, model, lookahead = run_lookahead(skipped=(TOTAL,))
    assert TOTAL % K != 0 and torch.equal(model.w, lookahead.module.w)
    torch.testing.assert_close(model.w.double(), expected[-1][0], rtol=0, atol=1e-6)
    assert not torch.equal(history[-2][3], history[-2][4])   # step TOTAL - 1: off the beat, apart


def test_a_resumed_lookahead_continues_the_same_sequence(tmp_path: Path):
    _, straight, _ = run_lookahead()
    _, model, lookahead = run_lookahead(steps=range(1, 8))
    torch.save({"model": model.state_dict(), "lookahead": lookahead.state_dict()}, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    fresh = ThreeWeights()
    fresh.load_state_dict(saved["model"])
    again = Lookahead(fresh, K, DECAY, TOTAL)   # starts from the model's weights: the state must override them
    again.load_state_dict(saved["lookahead"])
    run_lookahead(model=fresh, lookahead=again, steps=range(8, TOTAL + 1))
    assert torch.equal(fresh.w, straight.w)


def test_lookahead_averages_bn_statistics_and_leaves_frozen_weights_alone():
    model = bn_model()
    model[1].weight.requires_grad_(False)                 # as train.bn_freeze_weight does
    lookahead = Lookahead(model, every=1, decay=0.9, total_steps=4)
    with torch.no_grad():
        model[1].weight.fill_(3.0)                        # the average holds 1.0 for it
    train_forward(model, 1)
    mean_before = lookahead.module[1].running_mean.double().clone()
    current_mean = model[1].running_mean.double().clone()
    lookahead.update(model, torch.tensor(2))
    keep = 0.9 * (2 / 4) ** 3
    torch.testing.assert_close(model[1].running_mean.double(), keep * mean_before + (1 - keep) * current_mean,
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(model[1].running_mean, lookahead.module[1].running_mean)
    assert torch.equal(model[1].weight, torch.full((3,), 3.0))   # not pulled towards the average's 1.0
    assert int(model[1].num_batches_tracked) == 1                # counters are not averaged


def test_lookahead_in_the_step_reads_nothing_back_and_lands_on_the_average(monkeypatch):
    """Through TrainStep (as the trainer builds it): after steps 1..4 the model is the
    optimizer's alone, after step 5 it equals the average; no call inside a step blocks
    the host (item, bool, tolist, ...)."""
    from cifar_ddp.assembly import build_optimization
    from cifar_ddp.distributed import DistContext
    from cifar_ddp.step import TrainStep

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    cfg = TrainConfig(lookahead_every_steps=K, ema_decay=0.9, precision="fp32")
    optimization = build_optimization(model, cfg, "fp32", DistContext(), total_steps=TOTAL)
    assert optimization.lookahead is not None and optimization.ema is not None
    step = TrainStep(model, optimization.optimizer, cfg, "fp32", torch.device("cpu"), first_step=0,
                     ema=optimization.ema, lookahead=optimization.lookahead)
    step.set_lr(0.1)
    reads = {"inside": False, "n": 0}
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, **kwargs):
            reads["n"] += reads["inside"]
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    g = torch.Generator().manual_seed(0)
    average = optimization.lookahead.module
    for n in range(1, 2 * K + 1):
        images, labels = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        reads["inside"] = True
        step(images, labels)
        reads["inside"] = False
        assert reads["n"] == 0, n
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), average.state_dict().values())
                   if b.is_floating_point())
        assert same == (n % K == 0), n


def test_lookahead_off_builds_nothing_and_without_a_run_length_too():
    from cifar_ddp.assembly import build_optimization
    from cifar_ddp.distributed import DistContext

    model = bn_model()
    assert build_optimization(model, TrainConfig(), "fp32", DistContext(), total_steps=TOTAL).lookahead is None
    on = TrainConfig(lookahead_every_steps=K)
    assert build_optimization(model, on, "fp32", DistContext()).lookahead is None   # lr_find, benchmarks
    built = build_optimization(model, on, "fp32", DistContext(), total_steps=TOTAL).lookahead
    assert (built.every, built.total_steps, built.decay_per_update) == (K, TOTAL, 0.95 ** K)


@pytest.mark.slow
def test_resume_with_lookahead_and_ema_is_bitwise_equal(tmp_path: Path):
    """A run stopped inside epoch 2 (6 steps an epoch; lookahead every 5: steps 5 and 10
    fire, the stop falls at 8, between them) and resumed ends bit for bit where the
    straight run does: the model, the EMA and the lookahead's average."""
    from cifar_ddp import checkpoint as ckpt
    from cifar_ddp.errors import Preempted

    from conftest import assert_bitwise_equal, train_in_process

    settings = {"train.epochs": 3, "data.fake_size": 96, "train.batch_size": 16, "train.ema_decay": 0.9,
                "train.lookahead_every_steps": K, "train.checkpoint_every_steps": 4}
    train_in_process(tmp_path / "a", **settings)
    with pytest.raises(Preempted):
        train_in_process(tmp_path / "b", **settings, **{"train.stop_after_steps": 8})
    train_in_process(tmp_path / "b", **settings, **{"train.resume": "auto"})
    a, b = (ckpt.load_file(ckpt.checkpoint_dir(tmp_path / run) / "last.pt") for run in ("a", "b"))
    assert a["train_state"]["global_step"] == 18
    for key in ("model", "ema", "lookahead"):
        assert_bitwise_equal(a[key], b[key])
    # The last step copied the average back into the model.
    averaged = {k[len("module."):]: v for k, v in a["lookahead"].items() if k.startswith("module.")}
    assert all(torch.equal(averaged[k], v) for k, v in a["model"].items() if v.is_floating_point())


def test_the_ema_leaves_frozen_weights_as_they_were():
    """A frozen weight (train.bn_freeze_weight's BN gains, the whitening stem) is not
    blended: keep * w + (1 - keep) * w is not w in floating point."""
    model = bn_model()
    with torch.no_grad():
        model[1].weight.fill_(0.1)      # 0.1 does not survive the blend at keep = 2/11 (checked below)
    model[1].weight.requires_grad_(False)
    ema = WeightEma(model, decay=0.9)
    ema.update(model)
    ema.update(model)
    assert torch.equal(ema.module[1].weight, model[1].weight)
    keep = torch.tensor(2 / 11)
    assert not torch.equal(keep * model[1].weight + (1 - keep) * model[1].weight, model[1].weight)


@pytest.mark.parametrize("key, value", [("lookahead_every_steps", -1), ("lookahead_decay", 0.0),
                                        ("lookahead_decay", 1.5)])
def test_impossible_lookahead_settings_are_refused_naming_the_key(key, value):
    from cifar_ddp.config import config_from_dict
    from cifar_ddp.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^train\.{key} is {value}; it must be"):
        config_from_dict({"train": {key: value}})
    config_from_dict({"train": {"lookahead_every_steps": 0, "lookahead_decay": 1.0}})   # the edges that work


def test_resuming_a_run_without_the_lookahead_starts_the_average_at_the_resumed_weights(tmp_path: Path):
    """train.lookahead_every_steps newly set on a resume (or a checkpoint of an earlier
    version): the average must start at the weights resumed; left at this run's random
    initial weights, its first beat would pull the trained model most of the way back."""
    from cifar_ddp.config import load_config
    from cifar_ddp.distributed import DistContext
    from cifar_ddp.errors import Preempted
    from cifar_ddp.loggers import SilentLogger
    from cifar_ddp.trainer import Trainer

    from conftest import tiny_overrides, train_in_process

    settings = {"train.epochs": 2, "data.fake_size": 96, "train.batch_size": 16, "train.checkpoint_every_steps": 4}
    with pytest.raises(Preempted):
        train_in_process(tmp_path / "run", **settings, **{"train.stop_after_steps": 8})
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **settings, **{
        "train.resume": "auto", "train.lookahead_every_steps": K}))
    trainer = Trainer(cfg, DistContext(), logger=SilentLogger())
    assert trainer.state.global_step == 8
    averaged, resumed = trainer.optimization.lookahead.module.state_dict(), trainer.model.state_dict()
    assert averaged.keys() == resumed.keys()
    for key, value in resumed.items():
        assert torch.equal(averaged[key], value), key
