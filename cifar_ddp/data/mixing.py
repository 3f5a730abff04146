"""Mixup and CutMix for a whole epoch of batches at once, on the training device.

Each batch is mixed with itself rolled by one (image i with image i - 1), with one share
`lam` per batch, exactly as torchvision.transforms.v2.MixUp and CutMix do:
- mixup: images lam * x + (1 - lam) * x_rolled, lam ~ Beta(mixup_alpha, mixup_alpha);
- CutMix: lam ~ Beta(cutmix_alpha, cutmix_alpha); a box centred on a uniform pixel, of half
  sides floor(0.5 * sqrt(1 - lam) * size), clipped to the image, is pasted from x_rolled,
  and lam becomes the share of the image left uncovered.
The targets become lam * one_hot(y) + (1 - lam) * one_hot(y_rolled), float (B, classes).

Which batch is mixed (mix_prob), by which method (mix_switch_prob: CutMix when both are on),
its lam and its box centre are drawn for the whole epoch on the host when the epoch starts
(a few hundred numbers, with numpy: torch has no Beta sampler that takes a generator), from
(seed, rank, epoch) alone, so a run resumed inside the epoch draws the same. The images and
targets are then mixed on the device; the step sees fixed-shape tensors and nothing else.

Ramp (mix_ramp_epochs = E > 0): in epoch e (counted from 0) the partner's share 1 - lam is
multiplied by min(1, (e + 1) / E) before the box is sized, so mixing grows to full strength
by epoch E. With mixup_alpha = 1 the partner's share in epoch e is U(0, min(1, (e + 1) / E)).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..config import AugmentConfig

# Mixes the seed of the epoch's draws, so that they are not those of any other stream.
MIX_STREAM = 0x6D1C


def mixing_enabled(cfg: AugmentConfig) -> bool:
    return cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0


def ramp_factor(cfg: AugmentConfig, epoch: int) -> float:
    """The multiplier of the partner's share in `epoch` (from 0)."""
    if cfg.mix_ramp_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + 1) / cfg.mix_ramp_epochs)


def dominant_labels(targets: torch.Tensor) -> torch.Tensor:
    """The label a mixed image is scored against for train accuracy: the larger share
    (an exact tie, lam = 1/2, goes to the lower class index). Hard labels pass through."""
    return targets.argmax(1) if targets.ndim == 2 else targets


class BatchMix:
    """Draw an epoch's mixing (`sample`), then mix whole batches with it (`apply`)."""

    def __init__(self, cfg: AugmentConfig, num_classes: int) -> None:
        self.cfg = cfg
        self.num_classes = num_classes

    def sample(self, batches: int, height: int, width: int, epoch: int, seed: int) -> Dict[str, np.ndarray]:
        """Per batch: lam (float64, the share of the batch's own images), cutmix (bool) and
        the box rows [top, bottom) and columns [left, right) (empty for mixup or no mixing)."""
        cfg = self.cfg
        rng = np.random.default_rng([seed, MIX_STREAM])
        mixed = rng.random(batches) < cfg.mix_prob
        if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
            cutmix = rng.random(batches) < cfg.mix_switch_prob
        else:
            cutmix = np.full(batches, cfg.cutmix_alpha > 0)
        alpha = np.where(cutmix, cfg.cutmix_alpha, cfg.mixup_alpha)
        lam = rng.beta(np.maximum(alpha, 1e-12), np.maximum(alpha, 1e-12))
        centre_y = rng.integers(0, height, batches)
        centre_x = rng.integers(0, width, batches)
        lam = 1.0 - (1.0 - lam) * ramp_factor(cfg, epoch)
        lam = np.where(mixed, lam, 1.0)
        return self.boxes(lam, cutmix & mixed, centre_y, centre_x, height, width)

    @staticmethod
    def boxes(lam: np.ndarray, cutmix: np.ndarray, centre_y: np.ndarray, centre_x: np.ndarray,
              height: int, width: int) -> Dict[str, np.ndarray]:
        """torchvision's CutMix box for each CutMix batch, and its lam adjusted to the area."""
        half = 0.5 * np.sqrt(1.0 - lam)
        half_h = np.where(cutmix, np.floor(half * height), 0).astype(np.int64)
        half_w = np.where(cutmix, np.floor(half * width), 0).astype(np.int64)
        top, bottom = np.maximum(centre_y - half_h, 0), np.minimum(centre_y + half_h, height)
        left, right = np.maximum(centre_x - half_w, 0), np.minimum(centre_x + half_w, width)
        area = (bottom - top) * (right - left) / (height * width)
        lam = np.where(cutmix, 1.0 - area, lam)
        return {"lam": lam, "cutmix": cutmix, "top": top, "bottom": bottom, "left": left, "right": right}

    def to_device(self, params: Dict[str, np.ndarray], device: torch.device) -> Dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in params.items()}

    def apply(self, images: torch.Tensor, labels: torch.Tensor,
              params: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Whole batches (k * B, C, H, W) and their labels (k * B,), with the k batches'
        parameters (on the device) -> mixed images and soft targets (k * B, classes)."""
        k = len(params["lam"])
        n, channels, height, width = images.shape
        x = images.view(k, n // k, channels, height, width)
        rolled = x.roll(1, 1)
        lam = params["lam"].to(images.dtype).view(k, 1, 1, 1, 1)
        blended = rolled * (1.0 - lam) + x * lam
        rows = torch.arange(height, device=images.device).view(1, height, 1)
        cols = torch.arange(width, device=images.device).view(1, 1, width)
        box = ((rows >= params["top"].view(k, 1, 1)) & (rows < params["bottom"].view(k, 1, 1))
               & (cols >= params["left"].view(k, 1, 1)) & (cols < params["right"].view(k, 1, 1)))
        pasted = torch.where(box.view(k, 1, 1, height, width), rolled, x)
        mixed = torch.where(params["cutmix"].view(k, 1, 1, 1, 1), pasted, blended)

        one_hot = F.one_hot(labels.view(k, n // k), self.num_classes).float()
        targets = one_hot.roll(1, 1) * (1.0 - lam.view(k, 1, 1)) + one_hot * lam.view(k, 1, 1)
        return mixed.reshape(n, channels, height, width), targets.view(n, self.num_classes)


__all__ = ["BatchMix", "dominant_labels", "mixing_enabled", "ramp_factor"]
