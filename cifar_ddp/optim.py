"""Optimizer and learning-rate schedule.

The schedule is a pure function of training progress (a fraction in [0, 1]),
not a stateful torch scheduler: a run resumed under another world size (so
with another number of steps per epoch) lands on the same point of the curve.
"""

from __future__ import annotations

import math
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


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW over the model's trainable parameters, in up to three groups: decayed
    weights; BN gains and other biases, not decayed (shrinking them fights normalization
    instead of regularizing the weights); BN biases at lr x train.bn_bias_lr_mult, not
    decayed (a group of their own only when the multiplier is not 1). With
    train.bn_freeze_weight the BN gains are frozen here (requires_grad off: no gradient,
    no update, and DDP leaves them out), as airbench keeps them at 1."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    if cfg.bn_freeze_weight:
        for norm in norms:
            if norm.weight is not None:
                norm.weight.requires_grad_(False)
    bn_biases = {id(m.bias) for m in norms if m.bias is not None} if cfg.bn_bias_lr_mult != 1.0 else set()
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    boosted: List[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in bn_biases:
            boosted.append(param)
        else:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if boosted:
        # step.TrainStep gives this group a device LR of its own, lr x lr_mult.
        groups.append({"params": boosted, "weight_decay": 0.0, "lr": lr * cfg.bn_bias_lr_mult,
                       "lr_mult": cfg.bn_bias_lr_mult})
    # Fused kernels: one launch per update, a learning rate read from a device tensor
    # (see step.TrainStep), and updates masked on the device when `found_inf` is set.
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
