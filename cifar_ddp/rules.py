"""Design rules, checked on the network itself (the `rules:` config section).

Each rule gives one result: whether it holds, and a line with the measured value and the
limit, e.g. `receptive field 67 < rules.min_receptive_field 91`. The numbers come from
the module: parameters counted, the receptive field from `receptive_field` (the walk over
every path of the torch.fx graph), layer order from one forward pass (`trace_layers`).
`summary.py` prints every result; the trainer stops on a broken one before it loads data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.fx
from torch import nn

from .config import RulesConfig
from .errors import UserError
from .layer_trace import TracedLayer, trace_layers
from .receptive_field import ReceptiveFieldError, receptive_field, trace_graph

# Node targets that average a whole map when their output is 1x1 (or no longer 4-D).
_AVERAGING_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_AVERAGING_FUNCTIONS = {"mean", "adaptive_avg_pool2d", "avg_pool2d", "adaptiveavgpool2d", "avgpool2d"}


@dataclass
class RuleResult:
    rule: str          # the config key, e.g. "min_receptive_field"
    ok: bool
    text: str          # the measured value against the limit


class RulesBroken(UserError):
    """One line per broken rule."""


def check_rules(model: nn.Module, rules: RulesConfig) -> List[RuleResult]:
    """Every rule the config sets, in the order of the `rules:` section."""
    results: List[RuleResult] = []
    if not any((rules.max_params, rules.min_receptive_field, rules.forbid, rules.blocks,
                rules.depthwise_separable_in, rules.dilated_in, rules.global_average_pooling)):
        return results
    names = {module: name for name, module in model.named_modules()}
    layers = [layer for layer in trace_layers(model) if layer.type_name != "<output>"]
    graph, graph_error = _graph(model)
    if rules.max_params:
        params = sum(p.numel() for p in model.parameters())
        sign = "<=" if params <= rules.max_params else ">"
        results.append(RuleResult("max_params", params <= rules.max_params,
                                  f"parameters {params:,} {sign} rules.max_params {rules.max_params:,}"))
    if rules.min_receptive_field:
        results.append(_receptive_field(model, rules.min_receptive_field))
    if rules.forbid:
        results.append(_forbid(model, names, graph, rules.forbid))
    if rules.blocks:
        results.append(_blocks(model, rules.blocks))
    children = dict(model.named_children())
    for block in rules.depthwise_separable_in:
        results.append(_depthwise_separable(block, children, layers, names))
    dilated = rules.blocks[:-1] if rules.dilated_in == ["all"] else rules.dilated_in
    for block in dilated:
        results.append(_dilated(block, children, layers, names))
    if rules.global_average_pooling:
        results.append(_global_average_pooling(graph, graph_error, dict(model.named_modules())))
    return results


def enforce(results: List[RuleResult], rules: RulesConfig, warn: bool = True) -> None:
    """Stop on broken rules (one line each), or warn (where `warn`: rank 0) when
    rules.enforce is false."""
    broken = [f"rule broken: {r.text}" for r in results if not r.ok]
    if not broken:
        return
    if rules.enforce:
        raise RulesBroken("\n".join(broken + ["(change the network, or set rules.enforce=false to train anyway)"]))
    for line in broken if warn else []:
        warnings.warn(f"{line} (rules.enforce=false: training anyway)", stacklevel=2)


def format_results(results: List[RuleResult]) -> str:
    if not results:
        return "design rules: none set (add a rules: section, e.g. rules: rules/seed.yaml)"
    held = sum(r.ok for r in results)
    lines = [f"design rules: {held} of {len(results)} hold"]
    lines += [f"  {'✔' if r.ok else '✘'} {r.text}" for r in results]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the rules


def _receptive_field(model: nn.Module, limit: int) -> RuleResult:
    try:
        rf = receptive_field(model).receptive_field
    except ReceptiveFieldError as exc:
        return RuleResult("min_receptive_field", False,
                          f"receptive field cannot be measured ({exc}) for rules.min_receptive_field {limit}")
    sign = ">=" if rf >= limit else "<"
    return RuleResult("min_receptive_field", rf >= limit, f"receptive field {rf} {sign} rules.min_receptive_field "
                                                          f"{limit}")


def _normalised(name: str) -> str:
    # MaxPool2d (a module) and max_pool2d (its functional form) are the same thing.
    return name.replace("_", "").lower()


def _forbid(model: nn.Module, names: Dict[nn.Module, str], graph: Optional[torch.fx.GraphModule],
            forbidden: List[str]) -> RuleResult:
    wanted = {_normalised(n): n for n in forbidden}
    found = [f"{type(m).__name__} at {names[m] or 'the model itself'}" for m in model.modules()
             if _normalised(type(m).__name__) in wanted]
    if graph is not None:
        for node in graph.graph.nodes:
            if node.op in ("call_function", "call_method"):
                target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
                if _normalised(target) in wanted:
                    found.append(f"{target}() in forward ({node.name})")
    listed = ", ".join(forbidden)
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        return RuleResult("forbid", False, f"{', '.join(found[:3])}{more}: forbidden by rules.forbid [{listed}]")
    return RuleResult("forbid", True, f"no {listed} anywhere (rules.forbid)")


def _blocks(model: nn.Module, wanted: List[str]) -> RuleResult:
    have = [name for name, _ in model.named_children()]
    listing = f"(the model's blocks: {', '.join(have) or 'none'})"
    missing = [b for b in wanted if b not in have]
    if missing:
        return RuleResult("blocks", False, f"no block {', '.join(missing)}: rules.blocks asks for "
                                           f"{' | '.join(wanted)} {listing}")
    order = [have.index(b) for b in wanted]
    if order != sorted(order):
        return RuleResult("blocks", False, f"blocks out of order: rules.blocks asks for {' | '.join(wanted)} "
                                           f"{listing}")
    return RuleResult("blocks", True, f"blocks {' | '.join(wanted)} in order (rules.blocks)")


def _block_layers(block: str, children: Dict[str, nn.Module], layers: List[TracedLayer]) -> Optional[List[TracedLayer]]:
    if block not in children:
        return None
    inside = {id(m) for m in children[block].modules()}
    return [layer for layer in layers if id(layer.module) in inside]


def _depthwise_separable(block: str, children, layers, names) -> RuleResult:
    key = "rules.depthwise_separable_in"
    found = _block_layers(block, children, layers)
    if found is None:
        return RuleResult("depthwise_separable_in", False, f"{block}: the model has no block '{block}' ({key})")
    convs = [layer.module for layer in found if isinstance(layer.module, nn.Conv2d)]
    near_miss = ""
    for i, conv in enumerate(convs):
        if conv.groups > 1 and conv.groups == conv.in_channels:
            after = convs[i + 1] if i + 1 < len(convs) else None
            if after is not None and tuple(after.kernel_size) == (1, 1):
                return RuleResult("depthwise_separable_in", True,
                                  f"{block}: depthwise conv {names[conv]} (groups {conv.groups}) then 1x1 conv "
                                  f"{names[after]} ({key})")
            near_miss = (f"; depthwise conv {names[conv]} is followed by "
                         + (f"a {after.kernel_size[0]}x{after.kernel_size[1]} conv {names[after]}" if after is not None
                            else "no conv in the block"))
    return RuleResult("depthwise_separable_in", False, f"{block}: no depthwise conv (groups == in_channels > 1) "
                                                       f"followed by a 1x1 conv{near_miss} ({key})")


def _dilated(block: str, children, layers, names) -> RuleResult:
    found = _block_layers(block, children, layers)
    if found is None:
        return RuleResult("dilated_in", False, f"{block}: the model has no block '{block}' (rules.dilated_in)")
    for layer in found:
        conv = layer.module
        if isinstance(conv, nn.Conv2d) and max(conv.dilation) > 1:
            return RuleResult("dilated_in", True, f"{block}: dilated conv {names[conv]} (dilation "
                                                  f"{max(conv.dilation)}) (rules.dilated_in)")
    return RuleResult("dilated_in", False, f"{block}: no conv with dilation > 1 (rules.dilated_in)")


def _graph(model: nn.Module):
    try:
        return trace_graph(model, (3, 32, 32)), ""
    except ReceptiveFieldError as exc:
        return None, str(exc)


def _shape(node: torch.fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _is_map(shape) -> bool:
    return shape is not None and len(shape) == 4 and shape[-1] * shape[-2] > 1


def _global_average_pooling(graph, graph_error: str, modules: Dict[str, nn.Module]) -> RuleResult:
    key = "rules.global_average_pooling"
    if graph is None:
        return RuleResult("global_average_pooling", False, f"the head cannot be checked: {graph_error} ({key})")
    # The spatial part ends at the last node that takes a map (more than 1x1) and gives a
    # tensor that is not one: the head. Its operation must be an average over the map.
    end = None
    for node in graph.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        out = _shape(node)
        if out is not None and not _is_map(out) and any(_is_map(_shape(n)) for n in node.all_input_nodes):
            end = node
    if end is None:
        return RuleResult("global_average_pooling", False, f"the network never reduces its feature map ({key})")
    size = next(_shape(n) for n in end.all_input_nodes if _is_map(_shape(n)))[-2:]
    if end.op == "call_module":
        module = modules[end.target]
        what, averages = f"{type(module).__name__} {end.target}", isinstance(module, _AVERAGING_MODULES)
    else:
        target = end.target if isinstance(end.target, str) else getattr(end.target, "__name__", str(end.target))
        what, averages = f"{target}()", _normalised(target) in _AVERAGING_FUNCTIONS
    if averages:
        return RuleResult("global_average_pooling", True, f"the head averages the whole {size[0]}x{size[1]} map "
                                                          f"({what}) ({key})")
    return RuleResult("global_average_pooling", False, f"the head does not average the map: the {size[0]}x{size[1]} "
                                                       f"map ends in {what}, not a global average ({key})")
