"""Model registry: `build_model("seed")` or `build_model(cfg)`."""

from __future__ import annotations

from typing import Callable, Dict, Union

from torch import nn

from ..config import Config, ModelConfig
from ..errors import ConfigError
from .seed import SeedNet

_BUILDERS: Dict[str, Callable[[ModelConfig], nn.Module]] = {
    "seed": lambda m: SeedNet(widths=m.widths, dropout=m.dropout, num_classes=m.num_classes),
}


def build_model(cfg_or_name: Union[str, Config, ModelConfig]) -> nn.Module:
    """Build the network a config (or a bare model name, with default settings) asks for."""
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
    return builder(model_cfg)


__all__ = ["build_model", "SeedNet"]
