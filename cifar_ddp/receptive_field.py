"""Receptive field computed from the module itself, over every path of its graph.

Along one path of layers, with j the distance (in input pixels) between two
neighbouring units of the current feature map and r the receptive field:
    effective kernel  k_eff = dilation * (k - 1) + 1
    r_out = r_in + (k_eff - 1) * j_in
    j_out = j_in * stride
Layers that do not mix pixels (BN, activations, dropout, 1x1 convs) leave r and
j unchanged. A model with branches (residual shortcuts, concatenations) is traced
into its graph with torch.fx; every node keeps the (r, j) of each distinct path
that reaches it, a join (x + f(x), cat) takes the union, and a unit's receptive
field is the largest over its paths: with centred kernels all paths are centred
on the same pixel, so the union of their windows is the largest one. Global
average pooling ends the spatial part of the network: the reported receptive
field is that of the last spatial feature map before it. What the walk cannot
describe (an op that changes the resolution without a known geometry, a model
torch.fx cannot trace, a layer called twice) is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .errors import UserError
from .layer_trace import TracedLayer, trace_layers

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


# The (receptive field, jump) of each distinct path from the input to a node.
Paths = FrozenSet[Tuple[int, int]]


class _LeafModuleTracer(torch.fx.Tracer):
    """Every module without children is one node (so a custom leaf like a cropping
    module is seen, and refused, by its name), everything else is traced through."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return next(iter(m.children()), None) is None


def _spatial_size(node: torch.fx.Node) -> Optional[Tuple[int, int]]:
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata):  # (a NamedTuple itself)
        # torch.chunk / split: a tuple of maps, each as large as the input (its pieces are
        # taken out by getitem nodes). Maps of different sizes have no one size.
        sizes = {_shape_size(getattr(part, "shape", None)) for part in meta}
        return sizes.pop() if len(sizes) == 1 else None
    return _shape_size(getattr(meta, "shape", None))


def _shape_size(shape) -> Optional[Tuple[int, int]]:
    return (int(shape[-2]), int(shape[-1])) if shape is not None and len(shape) == 4 else None


def trace_graph(model: nn.Module, input_size: Sequence[int]) -> torch.fx.GraphModule:
    try:
        graph = _LeafModuleTracer().trace(model)
    except Exception as exc:  # fx raises many types; each means "not a static graph"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReceptiveFieldError(
            f"{type(model).__name__} cannot be traced into a static graph by torch.fx ({reason}); "
            "the receptive field is computed only for models without data-dependent control flow") from None
    traced = torch.fx.GraphModule(model, graph)
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        traced.eval()
        with torch.no_grad():
            ShapeProp(traced).propagate(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return traced


def receptive_field(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> ReceptiveFieldReport:
    """Per-layer receptive-field table of `model` for one input of `input_size` (C, H, W):
    one row per leaf layer in forward order (the summary's rows) and one per join."""
    layers = trace_layers(model, input_size)
    label_of: Dict[int, TracedLayer] = {}
    for layer in layers:
        if id(layer.module) in label_of and layer.type_name != "<output>":
            raise ReceptiveFieldError(f"{layer.label} is the same module as {label_of[id(layer.module)].label}, "
                                      "called twice; the receptive field of a reused layer is not computed")
        label_of[id(layer.module)] = layer
    traced = trace_graph(model, input_size)
    modules = dict(traced.named_modules())

    paths: Dict[torch.fx.Node, Paths] = {}     # spatial nodes only
    ended: Dict[torch.fx.Node, bool] = {}      # nodes after global pooling
    rows: List[RFRow] = []
    final_paths: set = set()

    def largest(node_paths: Paths) -> Tuple[int, int]:
        return max(node_paths) if node_paths else (1, 1)

    for node in traced.graph.nodes:
        if node.op == "placeholder":
            paths[node] = frozenset({(1, 1)})
            continue
        if node.op in ("get_attr", "output"):
            if node.op == "output":
                for arg in node.all_input_nodes:
                    final_paths.update(paths.get(arg, ()))
            continue
        inputs = node.all_input_nodes
        incoming = frozenset().union(*(paths[n] for n in inputs if n in paths))
        after_global = any(ended.get(n, False) for n in inputs)
        in_hw = next((_spatial_size(n) for n in inputs if _spatial_size(n) is not None), None)
        out_hw = _spatial_size(node)
        layer = label_of.get(id(modules[node.target])) if node.op == "call_module" else None
        name = layer.label if layer is not None else node.name
        if not incoming:
            # After global pooling every unit sees the whole image; a constant sees nothing.
            # (A node that mixes a spatial input with a global one, like a squeeze-excitation
            # gate, stays spatial: its local paths go on.)
            ended[node] = after_global
            if layer is not None:
                rows.append(RFRow(name, 1, 1, 1, 1, 0, 0, 0, out_hw or (1, 1), is_global=after_global))
            continue
        geometry = _geometry(layer) if layer is not None else None
        if geometry is not None:
            kernel, stride, padding, dilation = geometry
            effective = dilation * (kernel - 1) + 1
            paths[node] = frozenset((r + (effective - 1) * j, j * stride) for r, j in incoming)
        elif out_hw is None or (out_hw == (1, 1) and in_hw != (1, 1)):
            # Global pooling (or a flatten into a linear layer): the spatial part ends here.
            final_paths.update(incoming)
            ended[node] = True
            if layer is not None:
                rf, jump = largest(incoming)
                rows.append(RFRow(name, in_hw[0], 1, in_hw[0], in_hw[0], 0, jump, rf, (1, 1), is_global=True))
            continue
        elif out_hw == in_hw:
            kernel, stride, padding, dilation, effective = 1, 1, 0, 1, 1
            paths[node] = incoming
        else:
            what = name if layer is not None else f"the operation '{node.name}' ({node.target})"
            raise ReceptiveFieldError(
                f"{what} changes the feature map from {in_hw} to {out_hw} and is not a layer whose "
                "geometry is known (Conv2d, MaxPool2d, AvgPool2d, global pooling)")
        joins = sum(1 for n in inputs if n in paths) > 1
        if layer is not None or joins:
            rf, jump = largest(paths[node])
            rows.append(RFRow(name, kernel, dilation, effective, stride, padding, jump, rf, out_hw))
    rf = largest(frozenset(final_paths))[0]
    for layer in layers:  # the summary's pseudo-row for an output that is not a layer's
        if layer.type_name == "<output>":
            rows.append(RFRow(layer.label, 1, 1, 1, 1, 0, 0, rf, (1, 1), is_global=bool(ended)))
    return ReceptiveFieldReport(rows=rows, receptive_field=rf)
