"""Model registry: `build_model("seed")` or `build_model(cfg)`."""

from __future__ import annotations

from typing import Any, Callable, Dict, Union

from torch import nn

from ..config import RESIDUAL_MODELS, WIDTHS_PER_MODEL, Config, ModelConfig, config_from_dict
from ..errors import ConfigError
from .seed import SeedNet
from .sep_resnet import SepResNet

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {"seed": SeedNet, "sep_resnet": SepResNet}


# Where Grad-CAM looks unless told otherwise: the last block with a spatial feature map
# (seed: 2x2, sep_resnet: 4x4).
CAM_LAYERS = {"seed": "c4", "sep_resnet": "c4"}


def find_layer(model: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted `path` (e.g. "c4" or "c3.2"), or a one-line error listing the blocks."""
    layers = dict(model.named_modules())
    if path not in layers or not path:
        blocks = ", ".join(name for name, _ in model.named_children())
        raise ConfigError(f"the model has no layer '{path}'; its blocks are {blocks} (dotted paths reach inside, "
                          "e.g. c3.1)")
    return layers[path]


def build_model(cfg_or_name: Union[str, Config, ModelConfig, Dict[str, Any]]) -> nn.Module:
    """Build the network a config asks for: a Config, its `model` part, a bare model name
    (default settings), or the config dict a checkpoint stores, so that
    `build_model(ck["config"]).load_state_dict(ck["model"])` rebuilds a trained model."""
    if isinstance(cfg_or_name, dict):
        cfg_or_name = config_from_dict(cfg_or_name)
    if isinstance(cfg_or_name, str):
        model_cfg = ModelConfig(name=cfg_or_name)  # type: ignore[arg-type]
    elif isinstance(cfg_or_name, Config):
        model_cfg = cfg_or_name.model
    else:
        model_cfg = cfg_or_name
    try:
        builder = _BUILDERS[model_cfg.name]
    except KeyError:
        raise ConfigError(
            f"unknown model '{model_cfg.name}'; available: {', '.join(sorted(_BUILDERS))}"
        ) from None
    widths = model_cfg.widths or WIDTHS_PER_MODEL[model_cfg.name][2]
    extra = {"zero_init_residual": model_cfg.zero_init_residual} if model_cfg.name in RESIDUAL_MODELS else {}
    return builder(widths=widths, dropout=model_cfg.dropout, num_classes=model_cfg.num_classes, **extra)


__all__ = ["build_model", "find_layer", "CAM_LAYERS", "SeedNet", "SepResNet"]
