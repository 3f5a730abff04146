"""model.dilated_depthwise: the two ways a dilated depthwise conv runs (native, spread) give
the dilated conv's outputs and gradients, keep one state_dict, are the ones that run, and
build into a network that compiles without a graph break (so nothing in it reads the device
back or branches on data: what a CUDA-graph capture needs). tests/test_gpu.py runs both on a GPU."""

import pytest
import torch
from torch import nn

from cifar_ddp import checkpoint as ckpt
from cifar_ddp.config import ModelConfig, TrainConfig, load_config
from cifar_ddp.errors import ConfigError
from cifar_ddp.models import build_model
from cifar_ddp.models.blocks import AUTO_DILATED_DEPTHWISE, DepthwiseConv2d, set_dilated_depthwise
from cifar_ddp.optim import build_optimizer
from cifar_ddp.step import TrainStep

from conftest import REPO, assert_same_conv, record_conv_calls

CHOICES = ("native", "spread")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("choice", CHOICES)
def test_each_path_is_the_dilated_conv_and_the_one_that_runs(choice, dilation, stride, channels_last, monkeypatch):
    """Against a plain nn.Conv2d(dilation=d, groups=c) in float64: outputs and the input and
    weight gradients to 1e-12; and the conv torch was asked for is the chosen one (spread: an
    undilated (2d+1)-wide kernel; native: the 3-wide kernel at dilation d)."""
    channels, size = 5, 11
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    reference = nn.Conv2d(channels, channels, 3, stride=stride, padding=dilation, dilation=dilation,
                          groups=channels, bias=False).double().to(memory_format=memory_format)
    conv = DepthwiseConv2d(channels, 3, dilation=dilation, stride=stride).double().to(memory_format=memory_format)
    conv.load_state_dict(reference.state_dict())
    assert set_dilated_depthwise(conv, choice) == 1
    x = torch.randn(3, channels, size, size, dtype=torch.float64).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    out_ref = reference(x)
    calls = record_conv_calls(monkeypatch)
    assert_same_conv(x, conv(x), conv.weight, out_ref, reference.weight)
    spread = choice == "spread" and dilation > 1
    assert calls == [(2 * dilation + 1, 1) if spread else (3, dilation)]


def test_auto_spreads_on_the_cpu_only():
    """auto's table: spread on a CPU, native on any other device; an undilated conv never spreads."""
    dilated, plain = DepthwiseConv2d(4, 3, dilation=2), DepthwiseConv2d(4, 3, dilation=1)
    assert dilated.dilated_depthwise == "auto" and AUTO_DILATED_DEPTHWISE == {"cpu": "spread"}
    assert dilated.runs_spread(torch.device("cpu"))
    assert not dilated.runs_spread(torch.device("cuda", 0))
    assert not plain.runs_spread(torch.device("cpu"))
    set_dilated_depthwise(dilated, "native")
    assert not dilated.runs_spread(torch.device("cpu"))
    set_dilated_depthwise(dilated, "spread")
    assert dilated.runs_spread(torch.device("cuda", 0))


def test_native_on_a_cpu_is_named_by_the_slow_kernel_warning_and_auto_is_not(tmp_path):
    """model.dilated_depthwise=native on a CPU runs the kernel that plain dilated nn.Conv2d
    runs 4-20x slower; the run says so, naming the first module and the count, and the fix.
    auto (which spreads on a CPU) and spread give no such warning."""
    import warnings

    from cifar_ddp.models import native_dilated_depthwise

    from conftest import train_in_process

    cpu = torch.device("cpu")
    dilated = ["c1.3.depthwise", "c2.0.depthwise", "c2.1.depthwise", "c3.0.depthwise", "c4.0.depthwise"]
    for choice, expected in (("native", dilated), ("auto", []), ("spread", [])):
        model = build_model(ModelConfig(name="sep_resnet", dilated_depthwise=choice))
        assert native_dilated_depthwise(model, cpu) == expected
    # On another device auto is native: the list is of what runs there, not of the setting.
    assert native_dilated_depthwise(build_model(ModelConfig(name="sep_resnet")), torch.device("cuda", 0)) == dilated
    # The seed net's dilated convs are dense, not depthwise: nothing to name.
    assert native_dilated_depthwise(build_model(ModelConfig(name="seed", dilated_depthwise="native")), cpu) == []
    with pytest.warns(UserWarning, match=rf"{dilated[0]} \(and 4 more\) is a dilated DepthwiseConv2d run natively "
                                         r"\(model.dilated_depthwise=native\): on a CPU torch runs it 4-20x slower"
                                         r".*leave model.dilated_depthwise at auto, or set it to spread"):
        train_in_process(tmp_path / "native", **{"train.epochs": 1, "model.name": "sep_resnet",
                                                 "model.dilated_depthwise": "native", "train.precision": "fp32"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_in_process(tmp_path / "auto", **{"train.epochs": 1, "model.name": "sep_resnet", "train.precision": "fp32"})
    assert not [w for w in caught if "4-20x slower" in str(w.message)]


def test_the_setting_reaches_every_depthwise_conv_and_keeps_the_state_dict():
    """build_model sets model.dilated_depthwise on all 9 of SepResNet's DepthwiseConv2d (5 dilated); the
    state_dict (keys, shapes, values from one seed) is the same whatever the setting, so a
    checkpoint trained under one loads under another."""
    state = {}
    for choice in ("auto", *CHOICES):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="sep_resnet", dilated_depthwise=choice))
        convs = [m for m in model.modules() if isinstance(m, DepthwiseConv2d)]
        assert len(convs) == 9 and sum(max(c.dilation) > 1 for c in convs) == 5
        assert {c.dilated_depthwise for c in convs} == {choice}
        state[choice] = model.state_dict()
    for choice in CHOICES:
        assert list(state[choice]) == list(state["auto"])
        for key, tensor in state["auto"].items():
            assert state[choice][key].shape == tensor.shape
            torch.testing.assert_close(state[choice][key], tensor, rtol=0, atol=0)
    model.load_state_dict(state["native"])   # strict: nothing missing, nothing extra


def test_a_checkpoint_written_before_the_setting_loads_under_each_and_scores_the_same():
    """tests/data/main_f4f7ebd's SepResNet checkpoint (main before this key existed): its
    stored config builds auto, its weights load strictly under every setting (nothing added
    to the state_dict), and all three give the same logits (float64)."""
    old = ckpt.load_file(REPO / "tests" / "data" / "main_f4f7ebd" / "sep_resnet_epoch2.pt")
    assert "dilated_depthwise" not in old["config"]["model"]
    model = build_model(old["config"])
    assert {m.dilated_depthwise for m in model.modules() if isinstance(m, DepthwiseConv2d)} == {"auto"}
    model.load_state_dict(old["model"])
    model = model.double().eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits = {}
    for choice in ("auto", *CHOICES):
        fresh = build_model({**old["config"], "model": {**old["config"]["model"], "dilated_depthwise": choice}})
        fresh.load_state_dict(old["model"])   # strict
        with torch.no_grad():
            logits[choice] = fresh.double().eval()(x)
    for choice in CHOICES:
        torch.testing.assert_close(logits[choice], logits["auto"], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits["auto"], rtol=0, atol=0)


def test_a_bad_choice_is_one_config_error_line_naming_the_choices():
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "configs" / "sep_resnet10.yaml", ["model.dilated_depthwise=fast"])
    message = str(error.value)
    assert "\n" not in message and "model.dilated_depthwise" in message and "'fast'" in message
    assert all(f"'{choice}'" in message for choice in ("auto", "native", "spread"))
    with pytest.raises(ValueError, match="auto, native, spread"):
        set_dilated_depthwise(DepthwiseConv2d(4), "fast")


@pytest.mark.parametrize("choice,channels_last", [("native", True), ("spread", True), ("spread", False)])
def test_sep_resnet_compiles_forward_and_backward_in_one_graph(choice, channels_last):
    """fullgraph=True fails on any graph break: a host read (.item(), bool(tensor)) or a Python
    branch on a tensor's value anywhere in SepResNet's forward or backward. aot_eager traces
    both without generating code (5-20 s each here); the inductor build is the slow test below."""
    torch._dynamo.reset()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="sep_resnet", dropout=0.0, dilated_depthwise=choice))
    model = model.to(memory_format=memory_format)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=memory_format)
    out = compiled(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for grad, param in zip(grads, model.parameters()):
        torch.testing.assert_close(grad, param.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("choice", CHOICES)
def test_sep_resnet_trains_under_train_compile(choice):
    """train.compile=true (inductor, on this CPU) with model.name=sep_resnet, against the eager
    step from the same weights: the same first loss and first update, within
    test_step.test_compiled_step_matches_eager's tolerances (eager fp32 CPU conv backward is
    itself ~1e-2 off a float64 reference)."""
    torch._dynamo.reset()
    losses, update = {}, {}
    for compile in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="sep_resnet", dropout=0.0, dilated_depthwise=choice))
        model = model.to(memory_format=torch.channels_last)
        initial = torch.cat([p.detach().flatten() for p in model.parameters()])
        cfg = TrainConfig(label_smoothing=0.0, compile=compile)
        step = TrainStep(model, build_optimizer(model, cfg, 0.05), cfg, "fp32", torch.device("cpu"), first_step=0)
        losses[compile] = []
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            images = torch.randn(16, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
            step.set_lr(0.05)
            step(images, torch.randint(0, 10, (16,), generator=g))
            losses[compile].append(step.read()["loss"])
            if seed == 0:
                update[compile] = torch.cat([p.detach().flatten() for p in model.parameters()]) - initial
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5)
    assert (update[True] - update[False]).norm() < 2e-2 * update[False].norm()
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)
