import pytest
import torch
from torch import nn

from cifar_ddp import ReceptiveFieldError, receptive_field
from cifar_ddp.models import build_model


def conv(cin, cout, k=3, s=1, d=1, p=None, groups=1):
    return nn.Conv2d(cin, cout, k, stride=s, dilation=d, padding=d * (k - 1) // 2 if p is None else p, groups=groups)


@pytest.mark.parametrize("layers, expected", [
    # plain 3x3 stack: 1 + 2 + 2 + 2
    ([conv(3, 4), conv(4, 4), conv(4, 4)], 7),
    # strided: 3 (j=1) -> stride 2 conv adds 2 -> 5, j=2 -> next 3x3 adds 4 -> 9
    ([conv(3, 4), conv(4, 4, s=2), conv(4, 4)], 9),
    # dilated 3x3 with d=2 behaves like 5x5: 1 + 4 = 5, then + 2 = 7
    ([conv(3, 4, d=2), conv(4, 4)], 7),
    # 1x1 leaves it unchanged
    ([conv(3, 4, k=1), conv(4, 4), conv(4, 4, k=1)], 3),
    # depthwise 3x3 counts like any 3x3
    ([conv(3, 6), conv(6, 6, groups=6), conv(6, 8, k=1)], 5),
    # dilated and strided: k_eff = 5 -> +4, j=2; then 3x3 -> +4 => 9
    ([conv(3, 4, s=2, d=2), conv(4, 4)], 9),
    # pooling counts as a kernel too: 3 -> maxpool 2/2 adds 1 -> 4, j=2 -> 3x3 adds 4 -> 8
    ([conv(3, 4), nn.MaxPool2d(2), conv(4, 4)], 8),
    # two strides: 3 (j=2) -> +2*2 = 7 (j=4) -> dilated +4*4 = 23
    ([conv(3, 4, s=2), conv(4, 4, s=2), conv(4, 4, d=2)], 23),
    # three strides, a 5x5 and a strided dilated conv: 5 (j=2) -> +4*2 = 13 (j=4) -> +2*4 = 21 (j=8) -> +2*8 = 37
    ([conv(3, 4, k=5, s=2), conv(4, 4, s=2, d=2), conv(4, 4, s=2), conv(4, 4)], 37),
])
def test_hand_computed_stacks(layers, expected):
    model = nn.Sequential(*layers, nn.ReLU())
    assert receptive_field(model, (3, 32, 32)).receptive_field == expected


def test_seed_network_is_91():
    report = receptive_field(build_model("seed"))
    assert report.receptive_field == 91
    rows = {r.layer: r for r in report.rows}
    assert rows["Conv2d-5"].dilation == 2 and rows["Conv2d-5"].effective_kernel == 5
    assert rows["Conv2d-13"].stride == 2 and rows["Conv2d-13"].jump == 2
    assert rows["AdaptiveAvgPool2d-53"].is_global
    assert rows["Conv2d-50"].receptive_field == 91 and rows["Conv2d-50"].output_size == (2, 2)


def gradient_extent(model: nn.Module, size: int) -> int:
    """Rows of the input that influence the central unit of the last feature map."""
    model = model.eval().double()
    total = torch.zeros(size, size, dtype=torch.float64)
    torch.manual_seed(0)
    for _ in range(3):
        # Positive inputs and weights: no ReLU cuts a path, so every pixel in the field shows.
        x = torch.rand(1, 3, size, size, dtype=torch.float64, requires_grad=True)
        out = model(x)
        h, w = out.shape[-2:]
        out[0, :, h // 2, w // 2].sum().backward()
        total += x.grad[0].abs().sum(0)
    rows = torch.nonzero(total.sum(1) > 0).flatten()
    return int(rows.max() - rows.min() + 1)


def test_empirical_extent_matches_for_seed_features():
    model = build_model("seed")
    features = nn.Sequential(model.c1, model.c2, model.c3, model.c4)
    with torch.no_grad():
        for m in features.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.abs_()
    assert gradient_extent(features, 192) == receptive_field(features, (3, 192, 192)).receptive_field == 91


@pytest.mark.parametrize("layers", [
    [conv(3, 4, s=2, d=2), conv(4, 4, d=3), nn.AvgPool2d(3, 2, 1), conv(4, 4)],
    [conv(3, 4, k=5, s=2), conv(4, 4, groups=4), conv(4, 4, s=2, d=2)],
])
def test_empirical_extent_matches_other_stacks(layers):
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.abs_()
    assert gradient_extent(model, 96) == receptive_field(model, (3, 96, 96)).receptive_field


class ResidualToy(nn.Module):
    """Shortcuts, a strided join and a concatenation: the longest path is every conv,
    3 (s2, j=2) +8 (d2) +4 (s2, j=4) +24 (d3) = 39; the shortest skips both branches, 5."""

    def __init__(self):
        super().__init__()
        self.stem = conv(3, 4, s=2)
        self.body = conv(4, 4, d=2)
        self.down = conv(4, 4, s=2)
        self.wide = conv(4, 4, d=3)
        self.narrow = conv(4, 4, k=1)

    def forward(self, x):
        x = self.stem(x)
        x = self.down(x + self.body(x))
        return torch.cat([self.wide(x), self.narrow(x)], dim=1)


def positive(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.abs_()
    return model


def test_residual_graph_takes_the_longest_path_and_matches_the_gradient():
    report = receptive_field(ResidualToy(), (3, 96, 96))
    assert report.receptive_field == 39
    rows = {r.layer: r for r in report.rows}
    assert rows["add"].receptive_field == 11 and rows["add"].jump == 2   # max(stem, stem + body)
    assert rows["cat"].receptive_field == 39 and rows["cat"].jump == 4
    assert gradient_extent(positive(ResidualToy()), 96) == 39


def test_sep_resnet_keeps_the_seed_rules():
    model = build_model("sep_resnet")
    assert sum(p.numel() for p in model.parameters()) <= 150_576
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) for m in model.modules())
    for block in (model.c1, model.c2, model.c3, model.c4):   # a dilated conv in every block
        assert any(isinstance(m, nn.Conv2d) and m.dilation[0] > 1 for m in block.modules())
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in model.c1.modules())
    assert receptive_field(model).receptive_field == 93
    features = positive(nn.Sequential(model.c1, model.c2, model.c3, model.c4))
    assert gradient_extent(features, 192) == receptive_field(features, (3, 192, 192)).receptive_field == 93


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv(3, 4)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else x


class InlineShrink(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv(3, 4)

    def forward(self, x):
        return self.a(x)[..., ::2, ::2]


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv(3, 3)

    def forward(self, x):
        return self.a(self.a(x))


@pytest.mark.parametrize("model, message", [
    (DataDependent(), "cannot be traced"),
    (InlineShrink(), "operation 'getitem'"),
    (Reused(), "called twice"),
])
def test_what_the_graph_walk_cannot_describe_is_refused(model, message):
    with pytest.raises(ReceptiveFieldError, match=message):
        receptive_field(model)


class Shrinker(nn.Module):
    def forward(self, x):
        return x[..., ::2, ::2]


def test_unknown_resolution_change_is_refused():
    with pytest.raises(ReceptiveFieldError, match="Shrinker"):
        receptive_field(nn.Sequential(conv(3, 4), Shrinker(), conv(4, 4)))


class UnequalJumps(nn.Module):
    """A join of two paths with different jumps, so the larger RF at the join is not the larger
    one afterwards: a 17x17 valid conv (32 -> 16, r 17, j 1) and a 1x1 stride-2 conv (32 -> 16,
    r 1, j 2), added, then a 21x21 conv. Hand-worked: the first path gives 17 + 20 * 1 = 37,
    the second 1 + 20 * 2 = 41; the RF is 41 (a join that kept only (17, 1) would say 37)."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(3, 4, 17, padding=0)
        self.skip = nn.Conv2d(3, 4, 1, stride=2)
        self.after = nn.Conv2d(4, 4, 21, padding=10)

    def forward(self, x):
        return self.after(self.big(x) + self.skip(x))


def test_a_join_keeps_every_path_not_only_its_largest():
    report = receptive_field(UnequalJumps(), (3, 32, 32))
    rows = {r.layer: r for r in report.rows}
    assert rows["add"].receptive_field == 17 and rows["add"].output_size == (16, 16)
    assert report.receptive_field == 41


def test_the_printed_table_holds_each_layers_geometry_as_hand_worked():
    """ReceptiveFieldReport.format (README's example): one row per layer, in order, then the
    total. Hand-worked for the seed's first layers: a 3x3 conv (RF 3), then the dilated
    3x3 (d=2, k_eff 5: RF 3 + 4 = 7), then a 3x3 (RF 9) and the 1x1 pointwise (RF 9)."""
    report = receptive_field(build_model("seed"), input_size=(3, 32, 32))
    lines = report.format().splitlines()
    assert lines[0].split() == ["layer", "k", "d", "k_eff", "s", "p", "jump", "RF", "out"]
    assert len(lines) == 2 + len(report.rows) + 1 and lines[-1] == "receptive field: 91"
    rows = {cells[0]: cells[1:] for cells in (line.split() for line in lines[2:-1])}
    assert rows["Conv2d-1"] == ["3", "1", "3", "1", "1", "1", "3", "32x32"]
    assert rows["Conv2d-5"] == ["3", "2", "5", "1", "2", "1", "7", "32x32"]
    assert rows["Conv2d-9"][6] == "9" and rows["Conv2d-10"][:3] == ["1", "1", "1"] and rows["Conv2d-10"][6] == "9"
    assert [line.split()[0] for line in lines[2:-1]] == [r.layer for r in report.rows]


class ChunkToy(nn.Module):
    """The channels split in two (torch.chunk, a tuple-valued node) and each half through its
    own 3x3, then joined: 1 + 2 (stem) + 2 (either half) + 2 (after the join) = 7. The graph
    walk once took the tuple for global pooling and reported the stem's 3."""

    def __init__(self, split: str):
        super().__init__()
        self.split = split
        self.stem, self.left, self.right, self.head = conv(3, 4), conv(2, 2), conv(2, 2, d=2), conv(4, 4)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1) if self.split == "chunk" else torch.split(x, 2, dim=1)
        return self.head(torch.cat([self.left(a), self.right(b)], dim=1))


@pytest.mark.parametrize("split", ["chunk", "split"])
def test_a_channel_split_keeps_the_paths_through_each_piece(split):
    # The dilated half is the longer path: 3 (stem) + 4 (3x3, d=2) + 2 (head) = 9.
    report = receptive_field(ChunkToy(split), (3, 48, 48))
    assert report.receptive_field == 9
    assert gradient_extent(positive(ChunkToy(split)), 48) == 9
