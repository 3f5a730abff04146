"""The seed network: C1 | C2 | C3 | C4 | Output, no max-pooling, 150,576 parameters,
receptive field 91 (tests/data/seed_summary.txt is the seed's reference layer table).

Resolution halves with a stride-2 3x3 conv at the end of C1, C2 and C3; each block
has one dilated conv (dilation 2), placed so the receptive field reaches 91:
    3 +4(d2) +2 +2(s2) | +4 +8(d2) +4(s2) | +8 +16(d2) +8(s2) | +32(d2) = 91.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import ConvUnit, DepthwiseSeparableUnit, DilatedConvUnit, TransitionUnit
from .registry import register_model
from .whitening import PatchWhitening


# Grad-CAM looks at C4, the last block with a spatial map (2x2).
@register_model("seed", cam_layer="c4", widths_meaning="narrow, middle, wide")
class SeedNet(nn.Module):
    def __init__(self, widths: Sequence[int] = (16, 32, 64), dropout: float = 0.05,
                 num_classes: int = 10, whiten_stem: bool = False) -> None:
        super().__init__()
        narrow, middle, wide = widths
        p = dropout
        # model.whiten_stem: C1 starts with the frozen 2x2 patch whitening (3 -> 24 channels,
        # 32 -> 31; the stride-2 convs still give 16, 8, 4; the receptive field grows by 1).
        stem = [PatchWhitening(3)] if whiten_stem else []
        self.c1 = nn.Sequential(
            *stem,
            ConvUnit(stem[0].out_channels if stem else 3, narrow, dropout=p),
            DilatedConvUnit(narrow, middle, dropout=p),
            DepthwiseSeparableUnit(middle, wide),
            ConvUnit(wide, wide, stride=2, dropout=p),                 # 32 -> 16
        )
        self.c2 = nn.Sequential(
            TransitionUnit(wide, narrow),
            ConvUnit(narrow, middle, dropout=p),
            DilatedConvUnit(middle, middle, dropout=p),
            ConvUnit(middle, wide, stride=2, dropout=p),               # 16 -> 8
        )
        self.c3 = nn.Sequential(
            TransitionUnit(wide, narrow),
            ConvUnit(narrow, middle, dropout=p),
            DilatedConvUnit(middle, wide, dropout=p),
            ConvUnit(wide, wide, stride=2, dropout=p),                 # 8 -> 4
        )
        # Padding 1 on a dilation-2 kernel trims the 4x4 map to 2x2, as in the seed.
        self.c4 = nn.Sequential(
            TransitionUnit(wide, narrow),
            DilatedConvUnit(narrow, wide, padding=1),                  # 4 -> 2
        )
        self.output = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(wide, num_classes, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c4(self.c3(self.c2(self.c1(x))))
        return self.output(x).flatten(1)
