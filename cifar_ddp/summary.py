"""Layer table of a model, in the layout of the seed's torchsummary table, plus
receptive-field and multiply-accumulate columns, then one line per design rule of the
config (rules:), each with the measured value and the limit.

    python -m cifar_ddp.summary --config configs/seed.yaml
    python -m cifar_ddp.summary --config configs/seed.yaml model.name=nets/tiny.py:TinyNet

Exit status: 0 when every rule holds (or none is set), 2 when one is broken or the
config or model cannot be built - usable as a check in a student's CI.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import List, Sequence

from torch import nn

from .config import load_config
from .errors import EXIT_USER_ERROR, exit_on_user_error
from .layer_trace import TracedLayer, trace_layers
from .receptive_field import receptive_field


@dataclass
class SummaryRow:
    label: str
    output_shape: List[int]     # batch dimension written as -1, as torchsummary does
    params: int
    macs: int
    receptive_field: str


def _macs(layer: TracedLayer) -> int:
    m = layer.module
    if isinstance(m, nn.Conv2d):
        out_elements = 1
        for size in layer.output_shape[1:]:
            out_elements *= size
        kh, kw = m.kernel_size
        return out_elements * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.Linear):
        return m.in_features * m.out_features
    return 0


def summarize(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> List[SummaryRow]:
    rf_rows = {r.layer: r for r in receptive_field(model, input_size).rows}
    rows = []
    for layer in trace_layers(model, input_size):
        rf = rf_rows[layer.label]
        rows.append(SummaryRow(
            label=layer.label,
            output_shape=[-1, *layer.output_shape[1:]],
            params=layer.params,
            macs=_macs(layer),
            receptive_field="global" if rf.is_global else str(rf.receptive_field),
        ))
    return rows


def format_summary(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> str:
    rows = summarize(model, input_size)
    rf = receptive_field(model, input_size).receptive_field
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    width = 64 + 20
    lines = [
        "-" * width,
        f"{'Layer (type)':>20}  {'Output Shape':>25} {'Param #':>15} {'RF':>6} {'MACs':>12}",
        "=" * width,
    ]
    for r in rows:
        lines.append(f"{r.label:>20}  {str(r.output_shape):>25} {r.params:>15,} "
                     f"{r.receptive_field:>6} {r.macs:>12,}")
    lines += [
        "=" * width,
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
        f"Total MACs per image: {sum(r.macs for r in rows):,}",
        f"Receptive field: {rf}",
        "-" * width,
    ]
    return "\n".join(lines)


def print_summary(config: str | None, overrides: List[str]) -> int:
    from .models import build_model
    from .rules import check_rules, format_results

    def work() -> int:
        cfg = load_config(config, overrides)
        model = build_model(cfg)
        print(format_summary(model))
        results = check_rules(model, cfg.rules)
        print(format_results(results))
        return 0 if all(r.ok for r in results) else EXIT_USER_ERROR

    return exit_on_user_error(work)


if __name__ == "__main__":
    # `python -m cifar_ddp.summary`: the older name of `cifar-ddp summary`.
    from cifar_ddp.cli import run

    sys.exit(run("summary", sys.argv[1:], prog="python -m cifar_ddp.summary"))
