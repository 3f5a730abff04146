"""SepResNet: the seed's rules, built to learn fast.

Same skeleton as the seed - C1 | C2 | C3 | C4 | Output, no max-pooling, a dilated
conv in every block, global average pooling, at most 150,576 parameters, receptive
field >= 91 - but every block after the stem is made of *residual* depthwise-
separable units, so the parameters go into width (channels up to 192 against the
seed's 64) and depth, and every unit has an identity path for the gradient so that
the deeper net still trains fast. docs/results.md has what it reaches against the seed.

    C1      3x3 conv stem, 3 -> w1; separable residual unit, dilation 2;
            separable down unit (stride 2) to w2                        32 -> 16
    C2      2 separable residual units, both dilation 2; down to w3     16 -> 8
    C3      2 separable residual units (the first dilation 2); down     8 -> 4
    C4      separable residual unit, dilation 2                          4x4
    Output  GAP -> dropout -> linear w4 -> classes

Receptive field along the longest path (every conv, no shortcut taken):
    3 +4(d2) +2(s2) | +8(d2) +8(d2) +4(s2) | +16(d2) +8 +8(s2) | +32(d2) = 93
(`python -m cifar_ddp.summary model.name=sep_resnet` computes it from the module graph).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import DepthwiseConv2d
from .registry import register_model
from .whitening import PatchWhitening


class SeparableResidualUnit(nn.Module):
    """x + BN(pointwise(ReLU(BN(depthwise(x))))), then ReLU. The depthwise 3x3 may be
    dilated; channels and size are kept, so the shortcut is the identity."""

    def __init__(self, channels: int, dilation: int = 1) -> None:
        super().__init__()
        self.depthwise = DepthwiseConv2d(channels, 3, dilation=dilation)
        self.depthwise_bn = nn.BatchNorm2d(channels)
        self.depthwise_act = nn.ReLU()
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.depthwise_act(self.depthwise_bn(self.depthwise(x)))
        return self.act(x + self.pointwise_bn(self.pointwise(branch)))


class SeparableDownUnit(nn.Sequential):
    """Depthwise 3x3 with stride 2 -> BN -> ReLU -> pointwise to more channels -> BN -> ReLU:
    halves the resolution (no max-pooling) and widens."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            DepthwiseConv2d(in_channels, 3, stride=2),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


# Grad-CAM looks at C4, the last block with a spatial map (4x4).
@register_model("sep_resnet", cam_layer="c4", widths_meaning="C1, C2, C3, C4")
class SepResNet(nn.Module):
    def __init__(self, widths: Sequence[int] = (48, 96, 128, 192), dropout: float = 0.0,
                 num_classes: int = 10, zero_init_residual: bool = False, whiten_stem: bool = False) -> None:
        super().__init__()
        w1, w2, w3, w4 = widths
        # model.whiten_stem: C1 starts with the frozen 2x2 patch whitening (3 -> 24 channels,
        # 32 -> 31; the stride-2 convs still give 16, 8, 4; the receptive field grows by 1),
        # and the 3x3 stem conv that reads its 24 channels is depthwise-separable: a dense
        # 24 -> w1 3x3 would add 9,072 parameters and break the seed's budget; the separable
        # one adds 72 (148,314 in all with the stem's 312).
        if whiten_stem:
            whitening = PatchWhitening(3)
            stem = [whitening, nn.Sequential(DepthwiseConv2d(whitening.out_channels, 3),
                                             nn.Conv2d(whitening.out_channels, w1, 1, bias=False))]
        else:
            stem = [nn.Conv2d(3, w1, 3, padding=1, bias=False)]
        self.c1 = nn.Sequential(
            *stem,
            nn.BatchNorm2d(w1), nn.ReLU(),
            SeparableResidualUnit(w1, dilation=2),
            SeparableDownUnit(w1, w2),                                    # 32 (31 after the stem) -> 16
        )
        self.c2 = nn.Sequential(
            SeparableResidualUnit(w2, dilation=2),
            SeparableResidualUnit(w2, dilation=2),
            SeparableDownUnit(w2, w3),                                    # 16 -> 8
        )
        self.c3 = nn.Sequential(
            SeparableResidualUnit(w3, dilation=2),
            SeparableResidualUnit(w3),
            SeparableDownUnit(w3, w4),                                    # 8 -> 4
        )
        self.c4 = nn.Sequential(SeparableResidualUnit(w4, dilation=2))
        self.output = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Dropout(dropout),
            nn.Linear(w4, num_classes),
        )
        if zero_init_residual:
            for unit in self.modules():
                if isinstance(unit, SeparableResidualUnit):
                    nn.init.zeros_(unit.pointwise_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c4(self.c3(self.c2(self.c1(x))))
        return self.output(x)
