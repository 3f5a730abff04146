"""Networks: `build_model("seed")`, `build_model(cfg)`, or a user's own network named by
reference (`model.name: nets/tiny.py:TinyNet`, models/references.py); one registry
(`@register_model`, models/registry.py) holds the built-in ones and any a user adds."""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Union

import torch
from torch import nn

from ..config import Config, ModelConfig, config_from_dict
from ..errors import ConfigError, one_line
from .blocks import DepthwiseConv2d, set_dilated_depthwise
from .references import is_reference, require_named, resolve
from .registry import ModelEntry, register_model, registered_names

# Importing the built-in networks registers them (each module decorates its class).
from .mixgate import MixGateNet  # noqa: E402
from .seed import SeedNet  # noqa: E402
from .sep_resnet import SepResNet  # noqa: E402

INPUT_SHAPE = (1, 3, 32, 32)


def find_layer(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted `path` (e.g. "c4" or "c3.2"), or a one-line error listing the blocks."""
    layers = dict(model.named_modules())
    if path not in layers or not path:
        blocks = ", ".join(name for name, _ in model.named_children())
        raise ConfigError(f"the model has no layer '{path}'; its blocks are {blocks} (dotted paths reach inside, "
                          "e.g. c3.1)")
    return layers[path]


def build_model(cfg_or_name: Union[str, Config, ModelConfig, Dict[str, Any]], *,
                trust_model_code: bool = False) -> nn.Module:
    """Build the network a config asks for: a Config, its `model` part, a bare model name
    (default settings), or the config dict a checkpoint stores, so that
    `build_model(ck["config"]).load_state_dict(ck["model"])` rebuilds a trained model (a
    checkpoint of a user's network needs `trust_model_code=True`: its module is imported).

    The network is checked once on a 1x3x32x32 input (eval mode, no gradient, so neither
    its weights nor its BN statistics nor the random streams change): a forward pass that
    fails or an output that is not [1, num_classes] is a one-line ConfigError."""
    if isinstance(cfg_or_name, dict):
        name = str(cfg_or_name.get("model", {}).get("name", ModelConfig.name))
        require_named(name, [], trust_model_code, "this checkpoint")
        cfg_or_name = config_from_dict(cfg_or_name)
    if isinstance(cfg_or_name, str):
        model_cfg = ModelConfig(name=cfg_or_name)
    elif isinstance(cfg_or_name, Config):
        model_cfg = cfg_or_name.model
    else:
        model_cfg = cfg_or_name
    entry = resolve(model_cfg.name)
    kwargs = builder_arguments(entry, model_cfg)
    try:
        model = entry.builder(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's constructor: one line, whatever it raised
        raise ConfigError(f"model '{model_cfg.name}' could not be built with {kwargs} ({one_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model '{model_cfg.name}': its builder returned {type(model).__name__}, not an nn.Module")
    if model_cfg.bn_momentum:
        set_bn_momentum(model, model_cfg.bn_momentum)
    set_dilated_depthwise(model, model_cfg.dilated_depthwise)
    check_forward(model, model_cfg.name, model_cfg.num_classes)
    return model


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """model.bn_momentum on every BatchNorm (SyncBatchNorm included), whoever built it."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def builder_arguments(entry: ModelEntry, m: ModelConfig) -> Dict[str, Any]:
    """The keyword arguments the builder gets: each of model.widths, model.dropout,
    model.zero_init_residual, model.num_classes and model.whiten_stem that it takes (a set
    one it does not take is an error), then model.args, which win."""
    kwargs: Dict[str, Any] = {}
    widths = entry.default_widths
    if m.widths:
        if not entry.takes("widths"):
            raise ConfigError(f"model.widths is {m.widths} but {m.name} takes no widths; drop the setting, or "
                              f"pass its own arguments as model.args (it takes: {entry.describe_arguments()})")
        if widths is not None and (len(m.widths) != len(widths) or any(w < 1 for w in m.widths)):
            meaning = f" ({entry.widths_meaning})" if entry.widths_meaning else ""
            raise ConfigError(f"model.widths is {m.widths}; {m.name} takes {len(widths)} positive channel "
                              f"counts{meaning}, e.g. {widths}, or model.widths=[] for those")
        kwargs["widths"] = list(m.widths)
    if m.zero_init_residual and not entry.residual:
        residual = [n for n in registered_names() if resolve(n).residual]
        raise ConfigError(f"model.zero_init_residual=true needs a model with residual units "
                          f"({', '.join(residual)}); {m.name} has none: drop the setting")
    if m.whiten_stem and not entry.takes("whiten_stem"):
        takers = [n for n in registered_names() if resolve(n).takes("whiten_stem")]
        raise ConfigError(f"model.whiten_stem=true needs a model built to take the whitening stem "
                          f"({', '.join(takers)}); {m.name} is not: drop the setting")
    for key in ("dropout", "zero_init_residual", "num_classes", "whiten_stem"):
        if entry.takes(key):
            kwargs[key] = getattr(m, key)
    unknown = [k for k in m.args if not entry.takes(k)]
    if unknown:
        raise ConfigError(f"model.args.{unknown[0]} is not an argument of {m.name}; it takes: "
                          f"{entry.describe_arguments()}")
    kwargs.update(m.args)
    missing = [n for n, p in entry.parameters.items() if p.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ConfigError(f"{m.name} needs model.args.{missing[0]} (it takes: {entry.describe_arguments()})")
    return kwargs


@torch.no_grad()
def check_forward(model: nn.Module, name: str, num_classes: int) -> None:
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        output = model(torch.zeros(*INPUT_SHAPE, device=device))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model '{name}': a forward pass on a 1x3x32x32 input fails ({one_line(exc)})") from None
    finally:
        model.train(was_training)
    shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if shape != [1, num_classes]:
        raise ConfigError(f"model '{name}' returns {shape} for a 1x3x32x32 input; it must return logits of "
                          f"shape [N, num_classes] = [1, {num_classes}] (model.num_classes={num_classes})")


def plain_dilated_depthwise(model: nn.Module) -> List[str]:
    """Dilated depthwise convs built as a plain nn.Conv2d. On a CPU torch runs them 4-20x
    slower than undilated ones, and its bf16 kernel for them gave non-finite values at
    random with two threads (tests/test_user_models.py); blocks.DepthwiseConv2d is the
    same module with the same weights, without either problem."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels and max(m.dilation) > 1]


def cam_layer_name(model_cfg: ModelConfig, model: nn.Module) -> str:
    """Where Grad-CAM looks: the registered model's own choice, else the last module whose
    output is still a spatial map (for the seed and SepResNet both give c4)."""
    entry = resolve(model_cfg.name)
    return entry.cam_layer or last_spatial_module(model)


@torch.no_grad()
def last_spatial_module(model: nn.Module) -> str:
    finished = []
    names = {module: name for name, module in model.named_modules() if name}

    def hook(module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            finished.append(names[module])

    handles = [module.register_forward_hook(hook) for module in names]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        model(torch.zeros(*INPUT_SHAPE, device=param.device if param is not None else None))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if not finished:
        raise ConfigError("the model has no module with a spatial output for Grad-CAM; pass --cam-layer")
    # Hooks fire as modules finish, so a block finishes after its own layers: the last
    # spatial record is the outermost module producing the last map.
    return finished[-1]



def native_dilated_depthwise(model: nn.Module, device: torch.device) -> List[str]:
    """The dilated blocks.DepthwiseConv2d modules that run the native dilated kernel on
    `device` (model.dilated_depthwise=native; auto spreads them on a CPU): on a CPU they
    have plain_dilated_depthwise's cost."""
    return [name for name, m in model.named_modules()
            if isinstance(m, DepthwiseConv2d) and max(m.dilation) > 1 and not m.runs_spread(device)]


__all__ = ["build_model", "builder_arguments", "set_bn_momentum", "cam_layer_name", "check_forward", "find_layer", "is_reference", "native_dilated_depthwise", "plain_dilated_depthwise",
           "register_model", "registered_names", "require_named", "resolve", "SeedNet", "SepResNet"]
