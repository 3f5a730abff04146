"""A user's network named by an import reference, and the rule for when one may be imported.

    model.name: seed                         a registered name
    model.name: nets/tiny.py:TinyNet         a file anywhere (relative to the current folder)
    model.name: mypackage.nets:TinyNet       a module on sys.path (the current folder included)

The attribute must be an nn.Module subclass or a function registered with
@register_model: never an arbitrary callable, so a reference like `os:system` or
`subprocess:run` is refused before anything is called. Importing a module runs its
top-level code, so a reference that comes from a checkpoint (not from the user's own
config or command line) is imported only when the user names it again or passes
--trust-model-code (`require_named`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import List, Sequence

from torch import nn

from ..errors import ConfigError, one_line
from .registry import ModelEntry, entry_for_builder, registered_entry, registered_names


def is_reference(name: str) -> bool:
    return ":" in name and registered_entry(name) is None


def resolve(name: str) -> ModelEntry:
    """The registry entry `model.name` stands for; a one-line ConfigError when there is none."""
    entry = registered_entry(name)
    if entry is not None:
        return entry
    if ":" not in name:
        raise ConfigError(
            f"unknown model.name '{name}'; registered: {', '.join(registered_names())}; or name your own network "
            "as path/to/file.py:ClassName or package.module:ClassName")
    where, _, attribute = name.rpartition(":")
    if not where or not attribute.isidentifier():
        raise ConfigError(f"model.name '{name}' is not a reference of the form path/to/file.py:ClassName or "
                          "package.module:ClassName")
    module = _import_file(name, where) if where.endswith(".py") or os.sep in where or "/" in where \
        else _import_module(name, where)
    if not hasattr(module, attribute):
        found = _models_in(module)
        raise ConfigError(f"model.name '{name}': '{where}' has no '{attribute}'; "
                          + (f"the models it defines: {', '.join(found)}" if found else
                             "it defines no nn.Module class or @register_model builder"))
    target = getattr(module, attribute)
    registered = entry_for_builder(target)
    if registered is not None:
        return registered
    if inspect.isclass(target) and issubclass(target, nn.Module):
        return ModelEntry(name, target)
    what = "a class" if inspect.isclass(target) else ("a function" if callable(target) else type(target).__name__)
    raise ConfigError(f"model.name '{name}': '{attribute}' is {what}, not an nn.Module subclass or a builder "
                      "registered with @register_model (from cifar_ddp.models import register_model)")


def require_named(name: str, overrides: Sequence[str], trust_model_code: bool, source: str) -> None:
    """A model reference read from a checkpoint is imported only when the user named it on
    this command line (model.name=REF) or trusts the checkpoint's code (--trust-model-code)."""
    if not is_reference(name) or trust_model_code:
        return
    if f"model.name={name}" in overrides:
        return
    raise ConfigError(
        f"{source} was trained with the model '{name}', which is code outside cifar_ddp; importing it runs "
        f"that code: name it yourself with model.name={name} (or --trust-model-code) if you trust it")


def _import_file(name: str, where: str):
    path = Path(where).expanduser()
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"model.name '{name}': the file '{where}' {state} (relative paths start in the "
                          f"current folder, {Path.cwd()}); pass the path of a .py file")
    path = path.resolve()
    # One module per file, under a name of its own, so that importing it twice (each rank,
    # each rebuild) gives the same classes.
    module_name = f"cifar_ddp_user_model_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"model.name '{name}': '{where}' cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    # The file may import its neighbours (from blocks import ...): after everything else.
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - whatever the user's file raises, say it in one line
        del sys.modules[module_name]
        raise ConfigError(f"model.name '{name}': importing '{where}' failed ({one_line(exc)})") from None
    return module


def _import_module(name: str, where: str):
    # As `python -m` and uvicorn do: a package in the current folder is importable.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name and where.startswith(exc.name):
            raise ConfigError(f"model.name '{name}': no module '{where}' on sys.path (the current folder "
                              f"{Path.cwd()} is on it); check the spelling, or give a file: path/to/file.py:"
                              f"{name.rpartition(':')[2]}") from None
        raise ConfigError(f"model.name '{name}': importing '{where}' failed ({one_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model.name '{name}': importing '{where}' failed ({one_line(exc)})") from None


def _models_in(module) -> List[str]:
    return sorted(n for n, v in vars(module).items()
                  if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
                  and ((inspect.isclass(v) and issubclass(v, nn.Module)) or entry_for_builder(v) is not None))

