"""A trained model for use outside the trainer: rebuilt from a checkpoint, in eval mode,
with the training data's normalization built in, and image files read for it.

The model takes float RGB images in [0, 1], NCHW (N x 3 x 32 x 32), any batch size, and
returns logits. Pictures of another size are resized to 32 x 32 first (bilinear).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .config import config_from_dict
from .data.loaders import eval_batches
from .data.sources import ImageSplit
from .errors import UserError
from .models import build_model, require_named

IMAGE_SIZE = 32


class NormalizedModel(nn.Module):
    """(x - mean) / std, then the network: what the exported files contain."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def checkpoint_weights(payload: Dict[str, Any], ema: Optional[bool] = None) -> Tuple[Dict[str, torch.Tensor], bool]:
    """The state dict to evaluate and whether it is the EMA's. `ema=None` picks what the run
    itself evaluated: the EMA weights when the run kept them, else the raw ones."""
    has_ema = payload.get("ema") is not None
    if ema and not has_ema:
        raise UserError("this checkpoint has no EMA weights (the run had train.ema_decay=0); leave out --ema")
    if ema is False or not has_ema:
        return payload["model"], False
    # The EMA keeps AveragedModel's layout: the weights under "module.", plus n_averaged.
    return {k[len("module."):]: v for k, v in payload["ema"].items() if k.startswith("module.")}, True


@dataclass
class TrainedModel:
    model: NormalizedModel      # CPU, fp32, eval mode
    classes: List[str]
    used_ema: bool
    payload: Dict[str, Any]     # the whole checkpoint (config, data statistics, ...)


def load_for_inference(path: str | Path, ema: Optional[bool] = None, overrides: Sequence[str] = (),
                       trust_model_code: bool = False) -> TrainedModel:
    """The checkpoint's model, ready to run. A user's own network (a model reference in
    the checkpoint) is imported only when `overrides` name it (model.name=REF) or with
    `trust_model_code`: importing a module runs its code."""
    payload = ckpt.load_file(path)
    cfg = config_from_dict(payload["config"], list(overrides))
    require_named(cfg.model.name, overrides, trust_model_code, f"checkpoint '{path}'")
    model = build_model(cfg)
    state, used_ema = checkpoint_weights(payload, ema)
    model.load_state_dict(state)
    stats = payload["stats"]
    wrapped = NormalizedModel(model, stats["mean"], stats["std"]).eval()
    return TrainedModel(wrapped, list(payload["classes"]), used_ema, payload)


# What a folder's entries are taken for by name; a file named on the command line is read whatever its name.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def image_files(paths: Sequence[str | Path]) -> Tuple[List[Path], Dict[Path, int]]:
    """The files to classify: each named file, and every image file of each named folder
    (by suffix, sorted by name, not descending into sub-folders); with, per folder, how
    many of its entries were skipped as not images."""
    files: List[Path] = []
    skipped: Dict[Path, int] = {}
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)
            continue
        entries = sorted(path.iterdir())
        images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise UserError(f"folder '{path}' holds no image files ({', '.join(IMAGE_SUFFIXES)}); name the images "
                            "or a folder that holds some")
        files += images
        if len(entries) > len(images):
            skipped[path] = len(entries) - len(images)
    return files, skipped


def read_images(paths: Sequence[str | Path]) -> torch.Tensor:
    """Image files (PNG, JPEG, anything PIL reads) as float RGB in [0, 1], N x 3 x 32 x 32."""
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(img, dtype=np.uint8))
        except FileNotFoundError:
            raise UserError(f"image '{path}' does not exist") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"image '{path}' cannot be read as a picture ({exc})") from None
    if not arrays:
        raise UserError("no images given")
    return uint8_to_input(np.stack(arrays))


def uint8_to_input(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 (the datasets' layout) to the model's input."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).contiguous()


@torch.no_grad()
def probabilities(model: nn.Module, images: np.ndarray, stats, device: torch.device,
                  batch_size: int = 500) -> np.ndarray:
    """Softmax of `model` (the training model: normalized input) over N x 32 x 32 x 3 uint8."""
    model.eval()
    split = ImageSplit(images, np.zeros(len(images), dtype=np.int64))
    out = [model(x.float()).float().softmax(1).cpu() for x, _ in eval_batches(split, stats, batch_size, device)]
    return torch.cat(out).numpy()


__all__ = ["NormalizedModel", "TrainedModel", "checkpoint_weights", "load_for_inference", "IMAGE_SUFFIXES",
           "image_files", "read_images", "uint8_to_input", "probabilities"]
