"""The one model registry: `@register_model("name")` on an nn.Module class or on a function
that returns one, and `model_entry(name)` to find it again.

An entry knows what a config needs to know of a model, read from the builder itself where
it can be: its arguments and their defaults (the signature), whether it has residual units
(it takes `zero_init_residual`), how many channel widths it takes (the length of its
`widths` default) and, given at registration, where Grad-CAM looks and what the widths
mean. Nothing else in the package lists models.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from ..errors import ConfigError

Builder = Callable[..., nn.Module]

@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    # Dotted module path Grad-CAM looks at; "" = the last module with a spatial output.
    cam_layer: str = ""
    # What the channel widths are, in order (e.g. "narrow, middle, wide").
    widths_meaning: str = ""

    @property
    def parameters(self) -> Dict[str, inspect.Parameter]:
        try:
            params = inspect.signature(self.builder).parameters
        except (TypeError, ValueError):  # a builtin without a signature: say nothing about it
            return {}
        # self/cls never show for a class; *args cannot be set from a config.
        return {n: p for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    @property
    def takes_any_keyword(self) -> bool:
        try:
            params = inspect.signature(self.builder).parameters.values()
        except (TypeError, ValueError):
            return False
        return any(p.kind is p.VAR_KEYWORD for p in params)

    def takes(self, argument: str) -> bool:
        return argument in self.parameters or self.takes_any_keyword

    @property
    def residual(self) -> bool:
        """Whether model.zero_init_residual applies."""
        return "zero_init_residual" in self.parameters

    @property
    def default_widths(self) -> Optional[List[int]]:
        param = self.parameters.get("widths")
        if param is None or param.default is inspect.Parameter.empty:
            return None
        return list(param.default)

    def describe_arguments(self) -> str:
        """`width=24, num_classes=10, depth` - what model.args may set."""
        parts = []
        for name, param in self.parameters.items():
            parts.append(name if param.default is inspect.Parameter.empty else f"{name}={param.default!r}")
        if self.takes_any_keyword:
            parts.append("**kwargs")
        return ", ".join(parts) or "no arguments"


_REGISTRY: Dict[str, ModelEntry] = {}


def register_model(name: Optional[str] = None, *, cam_layer: str = "",
                   widths_meaning: str = "") -> Callable[[Builder], Builder]:
    """Decorator: `@register_model("tiny")` on an nn.Module subclass or a function returning
    an nn.Module makes `model.name: tiny` build it. The builder is returned unchanged."""

    def decorate(builder: Builder) -> Builder:
        if not callable(builder) or (inspect.isclass(builder) and not issubclass(builder, nn.Module)):
            raise TypeError(f"@register_model needs an nn.Module subclass or a function returning one, "
                            f"not {builder!r}")
        key = name or builder.__name__
        existing = _REGISTRY.get(key)
        if existing is not None and _qualified(existing.builder) != _qualified(builder):
            raise ConfigError(f"model name '{key}' is already registered for {_qualified(existing.builder)}; "
                              f"register {_qualified(builder)} under another name")
        _REGISTRY[key] = ModelEntry(key, builder, cam_layer=cam_layer, widths_meaning=widths_meaning)
        return builder

    return decorate


def registered_names() -> Tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def registered_entry(name: str) -> Optional[ModelEntry]:
    return _REGISTRY.get(name)


def entry_for_builder(builder: Any) -> Optional[ModelEntry]:
    """The registered entry of exactly this object (a function or class), if any."""
    for entry in _REGISTRY.values():
        if entry.builder is builder:
            return entry
    return None


def _qualified(builder: Any) -> str:
    return f"{getattr(builder, '__module__', '?')}.{getattr(builder, '__qualname__', repr(builder))}"
