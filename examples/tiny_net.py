"""A network of your own under the seed's rules (configs/rules/seed.yaml): blocks
C1 | C2 | C3 | C4 | Output, no max-pooling, a depthwise-separable conv in C1, a dilated
conv in every block, global average pooling, at most 150,576 parameters, RF >= 91.

    python -m cifar_ddp.summary --config configs/seed.yaml model.name=examples/tiny_net.py:TinyNet
"""
from torch import nn

from cifar_ddp.models.blocks import DepthwiseConv2d


def unit(cin, cout, kernel=3, stride=1, dilation=1, groups=1):
    """conv -> BN -> ReLU, padded to keep the size (halved by stride 2)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, dilation * (kernel - 1) // 2, dilation, groups,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def separable(cin, cout, stride=1, dilation=1):
    """Depthwise 3x3 (one filter per channel), then a pointwise 1x1 that mixes channels.
    DepthwiseConv2d is nn.Conv2d(groups=cin) that runs fast and finite on a CPU (README)."""
    depthwise = nn.Sequential(DepthwiseConv2d(cin, 3, dilation, stride), nn.BatchNorm2d(cin), nn.ReLU())
    return nn.Sequential(depthwise, unit(cin, cout, kernel=1))


class TinyNet(nn.Module):
    def __init__(self, width: int = 40, num_classes: int = 10):
        super().__init__()
        w = width
        self.c1 = nn.Sequential(unit(3, w), separable(w, 2 * w, dilation=2), separable(2 * w, 2 * w, stride=2))
        self.c2 = nn.Sequential(separable(2 * w, 2 * w, dilation=2), separable(2 * w, 3 * w, stride=2))
        self.c3 = nn.Sequential(separable(3 * w, 3 * w, dilation=2), separable(3 * w, 4 * w, stride=2))
        self.c4 = nn.Sequential(separable(4 * w, 4 * w, dilation=2), separable(4 * w, 4 * w, dilation=2))
        self.output = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, num_classes))

    def forward(self, x):
        return self.output(self.c4(self.c3(self.c2(self.c1(x)))))
