"""Run one forward pass and record every leaf layer in the order it executes.

Both the summary table and the receptive-field walk read this trace, so they
always describe the same layers in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import nn


@dataclass
class TracedLayer:
    index: int                  # 1-based, in forward order
    type_name: str              # e.g. "Conv2d"
    module: nn.Module
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.type_name}-{self.index}"

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters(recurse=False))


def _same_tensor(a: object, b: object) -> bool:
    """True when `a` is `b` or a view of the same memory (e.g. a flatten)."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.data_ptr() == b.data_ptr() and a.numel() == b.numel())


def _is_leaf(module: nn.Module) -> bool:
    return next(iter(module.children()), None) is None


@torch.no_grad()
def trace_layers(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> List[TracedLayer]:
    """Leaf layers of `model` in execution order, for one input of `input_size` (C, H, W).

    A final pseudo-record of type "<output>" is appended when the model's output is
    not the last layer's output (something like `y + skip` after the last layer).
    """
    records: List[TracedLayer] = []
    last_output: List[torch.Tensor] = []

    def hook(module: nn.Module, inputs, output) -> None:
        x = inputs[0] if inputs else None
        records.append(TracedLayer(
            index=len(records) + 1,
            type_name=type(module).__name__,
            module=module,
            input_shape=tuple(x.shape) if isinstance(x, torch.Tensor) else (),
            output_shape=tuple(output.shape) if isinstance(output, torch.Tensor) else (),
        ))
        last_output[:] = [output]

    handles = [m.register_forward_hook(hook) for m in model.modules() if _is_leaf(m)]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        output = model(torch.zeros(1, *input_size, device=device, dtype=dtype))
        if records and not _same_tensor(output, last_output[-1]):
            records.append(TracedLayer(len(records) + 1, "<output>", nn.Identity(), records[-1].output_shape,
                                       tuple(output.shape)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return records
