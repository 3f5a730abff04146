import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_ddp.config import load_config
from cifar_ddp.errors import ConfigError
from cifar_ddp.models import SeedNet, build_model
from cifar_ddp.models.blocks import DepthwiseConv2d
from cifar_ddp.summary import summarize

from conftest import REPO

SEED_TABLE = Path(__file__).parent / "data" / "seed_summary.txt"
ROW = re.compile(r"^\s*(\S+)\s+(\[.*?\])\s+([\d,]+)\s*$")


def seed_rows():
    rows = []
    for line in SEED_TABLE.read_text().splitlines():
        match = ROW.match(line)
        if match:
            label, shape, params = match.groups()
            rows.append((label, [int(v) for v in shape.strip("[]").split(",")], int(params.replace(",", ""))))
    return rows


def test_reference_table_is_complete_and_is_the_model():
    rows = seed_rows()
    model = build_model("seed")
    assert len(rows) == 54 == len(summarize(model))
    assert sum(r[2] for r in rows) == 150_576 == sum(p.numel() for p in model.parameters())


def test_summary_matches_seed_table_row_by_row():
    ours = [(r.label, r.output_shape, r.params) for r in summarize(build_model("seed"))]
    expected = seed_rows()
    assert len(ours) == len(expected)
    for mine, theirs in zip(ours, expected):
        assert mine == theirs


def test_parameter_count_and_output():
    model = build_model("seed")
    assert sum(p.numel() for p in model.parameters()) == 150_576
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)


def test_no_max_pooling_and_required_ingredients():
    model = build_model("seed")
    modules = list(model.modules())
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in modules)
    convs = [m for m in modules if isinstance(m, torch.nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 for c in convs), "a depthwise conv"
    for block in (model.c1, model.c2, model.c3, model.c4):
        assert any(isinstance(m, torch.nn.Conv2d) and m.dilation[0] > 1 for m in block.modules())
    assert isinstance(model.output[0], torch.nn.AdaptiveAvgPool2d)


def test_widths_and_dropout_come_from_config():
    cfg = load_config(None, ["model.widths=[8,16,32]", "model.dropout=0.2"])
    model = build_model(cfg)
    assert isinstance(model, SeedNet)
    assert model.c1[0][0].out_channels == 8
    assert all(m.p == 0.2 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("override, fragment", [
    ("model.name=resnet", "unknown model.name 'resnet'; registered: mixgate, seed, sep_resnet"),
    ("model.widths=[16,32]", "model.widths is [16, 32]; seed takes 3 positive channel counts (narrow, middle, "
                             "wide), e.g. [16, 32, 64]"),
    ("model.widths=[16,0,64]", "model.widths is [16, 0, 64]"),
])
def test_model_settings_the_model_cannot_take_are_config_errors(override, fragment):
    # The registry decides what a model takes (config.py names no model): the error comes
    # when the model is built, which the trainer does before it loads any data.
    cfg = load_config(None, [override])
    with pytest.raises(ConfigError) as err:
        build_model(cfg)
    assert fragment in str(err.value)


def test_summary_command_prints_table_rf_and_totals():
    out = subprocess.run([sys.executable, "-m", "cifar_ddp.summary", "--config", "configs/seed.yaml"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Total params: 150,576" in out.stdout
    assert "Receptive field: 91" in out.stdout
    assert "[-1, 64, 2, 2]" in out.stdout and "MACs" in out.stdout


@pytest.mark.parametrize("channels,size,dilation,stride", [(6, 12, 2, 1), (5, 11, 3, 1), (4, 12, 2, 2)])
def test_depthwise_conv_on_cpu_equals_the_dilated_conv_it_stands_for(channels, size, dilation, stride):
    """DepthwiseConv2d runs a dilated depthwise conv undilated over a spread-out kernel on the
    CPU (PyTorch's dilated depthwise backward is slow there): same outputs, same gradients,
    and the same state_dict as nn.Conv2d, so checkpoints written before it still load."""
    torch.manual_seed(0)
    reference = torch.nn.Conv2d(channels, channels, 3, stride=stride, padding=dilation, dilation=dilation,
                                groups=channels, bias=False).double()
    fast = DepthwiseConv2d(channels, 3, dilation=dilation, stride=stride).double()
    fast.load_state_dict(reference.state_dict())
    x = torch.randn(3, channels, size, size, dtype=torch.float64, requires_grad=True)
    from conftest import assert_same_conv

    assert_same_conv(x, fast(x), fast.weight, reference(x), reference.weight)
    assert fast.weight.shape == (channels, 1, 3, 3) and fast.dilation == (dilation, dilation)


def test_dilated_depthwise_convs_run_undilated_on_the_cpu(monkeypatch):
    """The reason DepthwiseConv2d exists: no dilated depthwise conv reaches PyTorch on the CPU."""
    from conftest import record_conv_calls

    calls = record_conv_calls(monkeypatch)
    model = build_model("sep_resnet")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    depthwise = calls
    assert (5, 1) in depthwise, "the dilated units ran as 5x5 undilated convs"
    assert all(d == 1 for _, d in depthwise), f"a dilated depthwise conv reached torch: {depthwise}"


def test_zero_init_residual_starts_every_unit_as_the_identity():
    from cifar_ddp.models.sep_resnet import SeparableResidualUnit

    x = torch.randn(2, 96, 8, 8)
    for flag in (True, False):
        model = build_model(load_config(None, ["model.name=sep_resnet", f"model.zero_init_residual={flag}"]))
        units = [m for m in model.modules() if isinstance(m, SeparableResidualUnit)]
        assert len(units) == 6
        wide = [u for u in units if u.depthwise.in_channels == 96]
        identity = torch.equal(wide[0](x), torch.relu(x))
        assert identity == flag, f"zero_init_residual={flag}: unit is identity: {identity}"
    with pytest.raises(ConfigError, match="zero_init_residual.*sep_resnet.*seed has none"):
        build_model(load_config(None, ["model.zero_init_residual=true"]))


def test_summary_macs_equal_torchs_flop_counter_layer_by_layer():
    """Multiply-accumulates of every conv (grouped and depthwise too) and linear layer, against
    torch.utils.flop_counter (2 FLOPs per MAC; biases not counted by either)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),        # depthwise
        torch.nn.Conv2d(8, 12, 1), torch.nn.Conv2d(12, 12, 5, padding=2, groups=3),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(12, 10))
    rows = summarize(model, (3, 16, 16))
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, 16, 16))
    flops = counter.get_flop_counts()
    layers = [m for m in model if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    names = [str(i) for i, m in enumerate(model) if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    ours = [r.macs for r in rows if r.macs]
    theirs = [sum(flops[f"Sequential.{name}"].values()) // 2 for name in names]
    assert len(ours) == len(layers) and ours == theirs
    # Hand-worked, the depthwise one: 8 x 8 x 8 outputs, one 3x3 input window of 1 channel each.
    assert ours[1] == 8 * 8 * 8 * 9
