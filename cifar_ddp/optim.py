"""Optimizer and learning-rate schedule.

The schedule is a pure function of training progress (a fraction in [0, 1]),
not a stateful torch scheduler: a run resumed under another world size (so
with another number of steps per epoch) lands on the same point of the curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from .config import TrainConfig


def peak_lr(cfg: TrainConfig, global_batch: int) -> float:
    """Linear scaling: `train.lr` is for a global batch of `train.lr_reference_batch`."""
    return cfg.lr * global_batch / cfg.lr_reference_batch


def lr_at(progress: float, cfg: TrainConfig, peak: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    start, end = peak / cfg.initial_div, peak / cfg.final_div
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        # No warm-up: from the peak at once, cosine down to lr/final_div.
        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    warm = cfg.warmup_frac
    if progress < warm:
        # Linear warm-up, as OneCycleLR does for its first phase.
        return start + (peak - start) * progress / warm
    fraction = (progress - warm) / (1.0 - warm)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of each global step of a run: `lr_at` over the run's
    `total_steps`. Pure: the same step gives the same rate, whatever came before."""
    cfg: TrainConfig
    peak: float
    total_steps: int

    def __call__(self, global_step: int) -> float:
        return lr_at(global_step / max(self.total_steps, 1), self.cfg, self.peak)


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    # BN gains and all biases are not decayed: shrinking them fights normalization
    # instead of regularizing the weights.
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # Fused kernels: one launch per update, a learning rate read from a device tensor
    # (see step.TrainStep), and updates masked on the device when `found_inf` is set.
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
