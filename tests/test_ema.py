"""The device EMA of the weights, against a float64 reference of the same rule: the first
update copies, then keep = min(decay, (1 + n) / (10 + n)); skipped steps change nothing;
BN's running statistics are averaged like the weights and its counter is copied."""

import torch

from cifar_ddp.ema import WeightEma


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
