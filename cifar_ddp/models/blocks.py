"""Reusable building blocks: each unit is an nn.Sequential so that its leaf layers
(Conv2d, BatchNorm2d, ReLU, Dropout) appear one by one, in forward order, in the
summary and the receptive-field walk; DepthwiseConv2d is itself such a leaf (a Conv2d)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class ConvUnit(nn.Sequential):
    """3x3 (or kxk) conv -> BN -> ReLU [-> Dropout].

    `padding=None` keeps the spatial size for stride 1 ("same" padding, which for
    a dilated kernel is dilation * (k - 1) / 2). `dropout=None` leaves the Dropout
    layer out altogether; 0.0 keeps it as a no-op so the layer table stays fixed.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        padding: Optional[int] = None,
        dropout: Optional[float] = None,
    ) -> None:
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        layers = [
            # No bias: the BN right after it has its own shift.
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        ]
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class DilatedConvUnit(ConvUnit):
    """A ConvUnit whose 3x3 kernel is spread over (2 * dilation + 1)^2 pixels:
    the receptive field grows like a 5x5 kernel's at the cost of a 3x3's weights."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 2, **kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, dilation=dilation, **kwargs)


class TransitionUnit(ConvUnit):
    """1x1 conv -> BN -> ReLU that squeezes channels at the start of a block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, dropout=None)


class DepthwiseSeparableUnit(nn.Sequential):
    """Depthwise 3x3 (one filter per channel) -> pointwise 1x1 -> BN -> ReLU.

    About 1/8 of a full 3x3 conv's weights for the same in/out channels. Both
    convs keep their bias, as in the seed (320 and 2,112 parameters at 32->64).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2,
                      groups=in_channels, bias=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=True),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


def spread_taps(weight: torch.Tensor, dilation: Tuple[int, int]) -> torch.Tensor:
    """The (k-1)*d+1 square kernel a dilated k x k kernel stands for: its taps d pixels
    apart, zeros between them. An undilated conv with it gives the dilated conv's output,
    and the weight gradient flows to the k x k taps alone."""
    out_channels, in_channels, kh, kw = weight.shape
    dh, dw = dilation
    # Interleave d-1 zero rows (columns) after every tap row (column), then drop the trailing ones.
    rows = torch.stack([weight] + [torch.zeros_like(weight)] * (dh - 1), dim=3)
    rows = rows.reshape(out_channels, in_channels, kh * dh, kw)
    cols = torch.stack([rows] + [torch.zeros_like(rows)] * (dw - 1), dim=4)
    cols = cols.reshape(out_channels, in_channels, kh * dh, kw * dw)
    return cols[:, :, : (kh - 1) * dh + 1, : (kw - 1) * dw + 1]


# How a dilated depthwise conv runs (model.dilated_depthwise): "native", torch's own dilated
# kernel; "spread", an undilated conv over the spread-out kernel (`spread_taps`); "auto", by
# the input's device type from this table. On the CPU spread is the fast one (PyTorch's CPU
# backward for a dilated depthwise conv is 4-20x slower than for an undilated one: a
# 48-channel 32x32 layer at batch 128, 266 ms against 56 ms forward + backward, in
# channels_last or not; that one layer was half of SepResNet's CPU step). Every other device
# runs native until a measurement there says otherwise (benchmarks/gpu_check.sh none
# issue29_sep times both on a GPU): then only this table changes.
DILATED_DEPTHWISE_CHOICES = ("auto", "native", "spread")
AUTO_DILATED_DEPTHWISE = {"cpu": "spread"}


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d(c, c, k, dilation=d, groups=c, bias=False) with "same" padding - the same
    module, parameters, state_dict and outputs - whose dilated form runs natively or as an
    undilated conv over the spread-out kernel, as `dilated_depthwise` says (see
    AUTO_DILATED_DEPTHWISE; set it on a whole network with set_dilated_depthwise). The choice
    is a fixed attribute, not state that changes per call, so a compiled or captured step
    traces the one path it was built with."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1, stride: int = 1) -> None:
        super().__init__(channels, channels, kernel_size, stride=stride, padding=dilation * (kernel_size - 1) // 2,
                         dilation=dilation, groups=channels, bias=False)
        self.dilated_depthwise = "auto"   # build_model sets model.dilated_depthwise

    def runs_spread(self, device: torch.device) -> bool:
        """Whether a call on `device` runs the spread kernel (an undilated conv never does)."""
        if self.dilation == (1, 1):
            return False
        choice = self.dilated_depthwise
        if choice == "auto":
            choice = AUTO_DILATED_DEPTHWISE.get(device.type, "native")
        return choice == "spread"

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.runs_spread(input.device):
            return super()._conv_forward(input, weight, bias)
        return F.conv2d(input, spread_taps(weight, self.dilation), bias, self.stride, self.padding, 1, self.groups)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dilated_depthwise={self.dilated_depthwise}"


def set_dilated_depthwise(model: nn.Module, choice: str) -> int:
    """`choice` (auto, native or spread) on every DepthwiseConv2d of `model`, whoever built it;
    returns how many there are. Call it before compiling or capturing: the step traces the
    path each module has then."""
    if choice not in DILATED_DEPTHWISE_CHOICES:   # config.py has refused it already for a config's value
        raise ValueError(f"dilated_depthwise is {choice!r}; expected one of {', '.join(DILATED_DEPTHWISE_CHOICES)}")
    convs = [m for m in model.modules() if isinstance(m, DepthwiseConv2d)]
    for conv in convs:
        conv.dilated_depthwise = choice
    return len(convs)
