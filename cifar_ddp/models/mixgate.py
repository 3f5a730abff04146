"""MixGateNet: the seed's rules, with the capacity where the pixels are.

SepResNet keeps 3% of its parameters at 32x32 and 44% at 4x4, where a feature map has 16
pixels. MixGateNet never goes below 8x8: C1 is a light 32x32 stage, C2 the heavy 16x16
one, C3 and C4 work at 8x8, and the head averages the 8x8 map. Its unit (`MixGateUnit`)
follows ConvNeXt and xvel/cifar10-tiniest, built from ops cuDNN does well:

    mixed depthwise  half the channels through a 3x3 kernel, half through a dilated 3x3
                     (dilation 2 or 3): local detail and a wide view in one layer
    BN
    gated expansion  1x1 conv to 2E channels, GLU (a * sigmoid(b)) back to E
    1x1 projection   E -> C, then BN whose gain scales the residual (per channel, learned;
                     0 with zero_init_residual, so that each unit starts as the identity)
    x + branch       no activation after the sum: the stream stays linear between units

    C1      3x3 stem conv 3 -> w1, BN, GELU; a unit (dilation 2); down to w2   32 -> 16
    C2      3 units (dilations 2, 3, 3); down to w3                             16 -> 8
    C3      1 unit (dilation 3)                                                  8x8
    C4      1 unit (dilation 3), BN                                              8x8
    Output  GAP -> linear w3 -> classes

"Down" is a stride-2 depthwise 3x3, a 1x1 conv to the next width and BN.

Parameters (widths 32, 80, 104, expansion 1): 146,250 against the seed's 150,576; each
unit of C channels and expansion E holds 9C (depthwise) + 2C (BN) + 2EC (expand) + EC
(project) + 2C (BN) = 13C + 3EC. Per resolution, counted at each layer's output map (a down
unit's stride-2 depthwise conv at the smaller map), against SepResNet and the seed
(tests/test_mixgate.py checks the first two columns):

    map       MixGateNet        SepResNet         seed
    32x32      4,416   3.0%      4,320   2.9%      7,696   5.1%
    16x16     63,728  43.6%     26,256  17.7%     52,000  34.5%
    8x8       77,056  52.7%     49,696  33.6%     42,848  28.5%
    4x4            -            65,728  44.4%     38,048  25.3%
    2x2            -                 -             9,344   6.2%
    head       1,050   0.7%      1,930   1.3%        640   0.4%
    MACs      25.2 M (64% at 16x16)  14.7 M       24.2 M

Receptive field along the longest path (the dilated half of every unit, no shortcut):
    3 (stem) +4 (d2) +2 (s2) | +8 (d2) +12 (d3) +12 (d3) +4 (s2) | +24 (d3) | +24 (d3) = 93
(at 16x16 a pixel of the map is 2 input pixels, at 8x8 it is 4: a dilation-3 kernel spans 7
map pixels, 6 x 4 = 24 more; `python -m cifar_ddp.summary model.name=mixgate` computes it
from the module graph).

On a GPU: every op is a dense or pointwise conv, an undilated or dilated depthwise 3x3, BN,
GELU, GLU or a sum, each on a whole batch (no tiny tensors); the two channel halves are
slices and one concatenation; nothing reads the device from the host, so the step can be
captured or compiled. Dilated depthwise convs are `blocks.DepthwiseConv2d`, which keeps them
fast on a CPU.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import DepthwiseConv2d
from .registry import register_model


class MixGateUnit(nn.Module):
    """x + BN(project(GLU(expand(BN(cat(dw3x3(x[:half]), dw3x3_dilated(x[half:]))))))).
    Channels and size are kept, so the shortcut is the identity."""

    def __init__(self, channels: int, dilation: int, expansion: float = 1.0) -> None:
        super().__init__()
        self.local_channels = channels // 2
        hidden = int(round(channels * expansion))
        self.local = DepthwiseConv2d(self.local_channels, 3)
        self.dilated = DepthwiseConv2d(channels - self.local_channels, 3, dilation=dilation)
        self.norm = nn.BatchNorm2d(channels)
        self.expand = nn.Conv2d(channels, 2 * hidden, 1, bias=False)   # values and gates: one GEMM
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.scale = nn.BatchNorm2d(channels)                           # its gain scales the residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The two slices are views; the cat is the one copy.
        mixed = torch.cat([self.local(x[:, :self.local_channels]), self.dilated(x[:, self.local_channels:])], 1)
        gated = F.glu(self.expand(self.norm(mixed)), dim=1)
        return x + self.scale(self.project(gated))


class DownUnit(nn.Sequential):
    """Stride-2 depthwise 3x3 -> 1x1 conv to more channels -> BN: halves the map without
    pooling and widens it."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            DepthwiseConv2d(in_channels, 3, stride=2),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )


# Grad-CAM looks at C4, the last block with a spatial map (8x8).
@register_model("mixgate", cam_layer="c4", widths_meaning="32x32, 16x16, 8x8 stages")
class MixGateNet(nn.Module):
    def __init__(self, widths: Sequence[int] = (32, 80, 104), expansion: float = 1.0, num_classes: int = 10,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.c1 = nn.Sequential(
            nn.Conv2d(3, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.GELU(),   # stem
            MixGateUnit(w1, dilation=2, expansion=expansion),
            DownUnit(w1, w2),                                                          # 32 -> 16
        )
        self.c2 = nn.Sequential(
            MixGateUnit(w2, dilation=2, expansion=expansion),
            MixGateUnit(w2, dilation=3, expansion=expansion),
            MixGateUnit(w2, dilation=3, expansion=expansion),
            DownUnit(w2, w3),                                                          # 16 -> 8
        )
        self.c3 = nn.Sequential(MixGateUnit(w3, dilation=3, expansion=expansion))
        # The stream is a sum of residuals: normalised once before the head.
        self.c4 = nn.Sequential(MixGateUnit(w3, dilation=3, expansion=expansion), nn.BatchNorm2d(w3))
        self.output = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(w3, num_classes))
        if zero_init_residual:
            for unit in self.modules():
                if isinstance(unit, MixGateUnit):
                    nn.init.zeros_(unit.scale.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c4(self.c3(self.c2(self.c1(x))))
        return self.output(x)
