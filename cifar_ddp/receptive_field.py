"""Receptive field computed from the module itself, layer by layer.

For a chain of layers, with j the distance (in input pixels) between two
neighbouring units of the current feature map and r the receptive field:
    effective kernel  k_eff = dilation * (k - 1) + 1
    r_out = r_in + (k_eff - 1) * j_in
    j_out = j_in * stride
Layers that do not mix pixels (BN, activations, dropout, 1x1 convs) leave r and
j unchanged. Global average pooling ends the spatial part of the network: the
reported receptive field is that of the last spatial feature map before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from torch import nn

from .errors import UserError
from .layer_trace import TracedLayer, trace_layers

_POINTWISE = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Mish, nn.Dropout, nn.Dropout2d, nn.Identity,
)


class ReceptiveFieldError(UserError):
    """The module holds something the chain formula cannot describe."""


@dataclass
class RFRow:
    layer: str
    kernel: int
    dilation: int
    effective_kernel: int
    stride: int
    padding: int
    jump: int
    receptive_field: int
    output_size: Tuple[int, int]
    is_global: bool = False


@dataclass
class ReceptiveFieldReport:
    rows: List[RFRow]
    receptive_field: int

    def format(self) -> str:
        head = f"{'layer':>22} {'k':>3} {'d':>3} {'k_eff':>5} {'s':>3} {'p':>3} {'jump':>5} {'RF':>5} {'out':>9}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            rf = "global" if r.is_global else str(r.receptive_field)
            lines.append(
                f"{r.layer:>22} {r.kernel:>3} {r.dilation:>3} {r.effective_kernel:>5} {r.stride:>3} "
                f"{r.padding:>3} {r.jump:>5} {rf:>5} {r.output_size[0]:>4}x{r.output_size[1]:<4}"
            )
        lines.append(f"receptive field: {self.receptive_field}")
        return "\n".join(lines)


def _square(value, what: str, layer: TracedLayer) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ReceptiveFieldError(
                f"{layer.label}: non-square {what} {tuple(value)}; the receptive field is only "
                "reported for square kernels, strides, paddings and dilations"
            )
        value = value[0]
    if not isinstance(value, int):
        raise ReceptiveFieldError(f"{layer.label}: {what}={value!r} is not an integer")
    return value


def _geometry(layer: TracedLayer) -> Optional[Tuple[int, int, int, int]]:
    """(kernel, stride, padding, dilation) of a layer that mixes pixels, or None."""
    m = layer.module
    if isinstance(m, nn.Conv2d):
        if m.padding == "same":
            pad = m.dilation[0] * (m.kernel_size[0] - 1) // 2
        elif m.padding == "valid":
            pad = 0
        else:
            pad = _square(m.padding, "padding", layer)
        return (_square(m.kernel_size, "kernel", layer), _square(m.stride, "stride", layer),
                pad, _square(m.dilation, "dilation", layer))
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        dilation = _square(getattr(m, "dilation", 1), "dilation", layer)
        stride = m.stride if m.stride is not None else m.kernel_size
        return (_square(m.kernel_size, "kernel", layer), _square(stride, "stride", layer),
                _square(m.padding, "padding", layer), dilation)
    return None


def receptive_field(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> ReceptiveFieldReport:
    """Per-layer receptive-field table of `model` for one input of `input_size` (C, H, W)."""
    rows: List[RFRow] = []
    rf, jump = 1, 1
    spatial_done = False
    for layer in trace_layers(model, input_size):
        if not layer.chained:
            raise ReceptiveFieldError(
                f"{layer.label} does not take the previous layer's output (a branch, skip connection "
                "or functional op sits in between); the receptive field of such a graph cannot be "
                "computed layer by layer"
            )
        out_hw = tuple(layer.output_shape[-2:]) if len(layer.output_shape) == 4 else (1, 1)
        in_hw = tuple(layer.input_shape[-2:]) if len(layer.input_shape) == 4 else (1, 1)
        geometry = _geometry(layer)
        is_global = False
        if spatial_done:
            # After global pooling every unit already sees the whole image.
            kernel, stride, padding, dilation = 1, 1, 0, 1
        elif geometry is not None:
            kernel, stride, padding, dilation = geometry
        elif isinstance(layer.module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and out_hw == (1, 1):
            kernel, stride, padding, dilation = in_hw[0], in_hw[0], 0, 1
            is_global = True
        elif isinstance(layer.module, _POINTWISE) or in_hw == out_hw:
            kernel, stride, padding, dilation = 1, 1, 0, 1
        else:
            raise ReceptiveFieldError(
                f"{layer.label} changes the feature map from {in_hw} to {out_hw} and is not a layer "
                "whose geometry is known (Conv2d, MaxPool2d, AvgPool2d, global pooling)"
            )
        effective = dilation * (kernel - 1) + 1
        if not spatial_done and not is_global:
            rf += (effective - 1) * jump
            jump *= stride
        spatial_done = spatial_done or is_global
        rows.append(RFRow(layer.label, kernel, dilation, effective, stride, padding, jump, rf,
                          (int(out_hw[0]), int(out_hw[1])), is_global=spatial_done))
    return ReceptiveFieldReport(rows=rows, receptive_field=rf)
