"""The Python API, for notebooks and scripts: train in this process, load a trained model.

    import cifar_ddp
    result = cifar_ddp.train("smoke", ["data.source=fake"], out_dir="runs/notebook")
    result.metrics["test_accuracy"], result.best_checkpoint
    model = cifar_ddp.load_model(result.best_checkpoint)    # eval mode; float RGB in [0, 1]

The same config, trainer and checkpoints as `cifar-ddp train`, in one process; a bad config
or file raises `cifar_ddp.UserError` (its message is the line the command would print),
nothing exits the interpreter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from torch import nn

from .errors import UserError


@dataclass
class TrainResult:
    metrics: Dict[str, Any]         # what `cifar-ddp train` prints as "final:" (test_accuracy, ...)
    best_checkpoint: Path           # out_dir/checkpoints/best.pt: the save with the best test accuracy
    last_checkpoint: Path           # out_dir/checkpoints/last.pt
    out_dir: Path


def train(config: Union[str, Path, Mapping[str, Any]] = "seed", overrides: Sequence[str] = (),
          **settings: Any) -> TrainResult:
    """Train as `cifar-ddp train` does, in this process, and return the final metrics and
    the checkpoints' paths.

    config: a packaged config's name ("seed", "smoke"; `cifar-ddp configs` lists them), a
    YAML or JSON file (a run's saved out_dir/config.json too), or a dict of the same shape.
    overrides: dotted `key=value` strings, as on the command line. settings: the same as
    keywords, a section as a dict (`train={"epochs": 1}`) or a top-level key
    (`out_dir="runs/x"`); they apply after `overrides`.
    """
    from .config import config_from_dict, load_config
    from .launcher import train_here

    if isinstance(overrides, str):
        raise UserError(f"overrides is the string {overrides!r}; pass a list of key=value strings, e.g. "
                        "['train.epochs=1']")
    dotted = [*overrides, *_dotted(settings)]
    cfg = config_from_dict(dict(config), dotted) if isinstance(config, Mapping) else load_config(config, dotted)
    metrics = train_here(cfg)
    checkpoints = Path(cfg.out_dir) / "checkpoints"
    return TrainResult(metrics, checkpoints / "best.pt", checkpoints / "last.pt", Path(cfg.out_dir))


def _dotted(settings: Mapping[str, Any], prefix: str = "") -> List[str]:
    """{"train": {"epochs": 1}} -> ["train.epochs=1"]. Values are written as JSON, which the
    override parser (YAML) reads back as the same type: "1" stays a string, 1 an int."""
    out: List[str] = []
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


def load_model(path: Union[str, Path], ema: Optional[bool] = None, trust_model_code: bool = False) -> nn.Module:
    """A trained model in eval mode on the CPU, from a checkpoint (.pt) or a safetensors
    export (its folder or its model.safetensors). It takes float RGB images in [0, 1],
    N x 3 x 32 x 32, and returns logits; the data's normalization is built in, and
    `model.classes` names the outputs. `ema`: the checkpoint's EMA weights (True) or raw
    ones (False); by default those the run evaluated. A checkpoint of a user's own network
    imports that network's file only with `trust_model_code=True`."""
    from .export import SAFETENSORS_WEIGHTS, load_safetensors
    from .inference import load_for_inference

    path = Path(path)
    if path.suffix == ".pt":
        trained = load_for_inference(path, ema=ema, trust_model_code=trust_model_code)
    elif path.suffix == ".safetensors" or (path / SAFETENSORS_WEIGHTS).is_file():
        if ema is not None:
            raise UserError("ema= chooses among a checkpoint's weights; an export holds one set: leave it out")
        trained = load_safetensors(path, trust_model_code=trust_model_code)
    else:
        raise UserError(f"'{path}' is neither a checkpoint (.pt) nor a safetensors export (a folder holding "
                        f"{SAFETENSORS_WEIGHTS}, or that file)")
    model = trained.model
    model.classes = list(trained.classes)
    return model


__all__ = ["TrainResult", "train", "load_model"]
