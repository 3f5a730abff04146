"""Optimizer and learning-rate schedule.

The schedule is a pure function of training progress (a fraction in [0, 1]),
not a stateful torch scheduler: a run resumed under another world size (so
with another number of steps per epoch) lands on the same point of the curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from .config import TrainConfig
from .errors import UserError


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


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float,
                    peak: Optional[float] = None) -> torch.optim.Optimizer:
    """SGD or AdamW over the model's trainable parameters, in up to three groups: decayed
    weights; BN gains and other biases, not decayed (shrinking them fights normalization
    instead of regularizing the weights); BN biases at lr x train.bn_bias_lr_mult, not
    decayed (a group of their own only when the multiplier is not 1). With
    train.bn_freeze_weight the BN gains are frozen here (requires_grad off: no gradient,
    no update, and DDP leaves them out), as airbench keeps them at 1. `peak`: the
    schedule's peak LR (default `lr`): Muon follows the same schedule and reaches
    train.muon_lr there (lr_find starts far below the peak)."""
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
    if cfg.optimizer == "muon":
        return MuonWithSGD(model, groups, cfg, lr, lr if peak is None else peak)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)


def muon_weights(model: nn.Module) -> List[nn.Parameter]:
    """The weights Muon takes: those of dense and pointwise convs (groups == 1). Depthwise
    convs are left to SGD (one 3x3 filter per channel is no matrix; timm routes them away
    too), and so are BatchNorm, biases and linear layers (the head)."""
    return [m.weight for m in model.modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.weight.requires_grad]


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) -> (out, in * kh * kw) in the order its memory allows (channels_last
    weights flatten as (out, kh * kw * in)); orthogonalization does not depend on the order
    of the columns, so Muon's update is the same either way."""
    if tensor.dim() == 4 and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last):
        tensor = tensor.permute(0, 2, 3, 1)
    return tensor.reshape(tensor.shape[0], -1)


class MuonWithSGD:
    """torch.optim.Muon for `muon_weights`, a fused SGD for the rest, stepped together.

    The step keeps TrainStep's rules (no host read, a device LR, masked non-finite updates):
    Muon runs at lr 1 on 2-D views that share the weights' memory, and its change to each
    weight (weight decay and update both scale with lr) is then scaled on the device by the
    group's LR tensor, or undone - weights and momentum - when `found_inf` is set.
    `param_groups` are SGD's groups and one Muon group over the 4-D weights (for the LR
    tensors and the GradScaler); Muon's own groups hold the 2-D views."""

    def __init__(self, model: nn.Module, groups: List[dict], cfg: TrainConfig, lr: float, peak: float) -> None:
        weights = muon_weights(model)
        chosen = {id(w) for w in weights}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in chosen]} for g in groups]
        self.sgd = torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov, fused=True)
        self.weights = weights
        self.matrices = [nn.Parameter(_as_matrix(w.detach()), requires_grad=False) for w in weights]
        self._view_weights()
        self.muon = torch.optim.Muon(self.matrices, lr=1.0, weight_decay=cfg.weight_decay,
                                     momentum=cfg.muon_momentum, nesterov=True)
        for m in self.matrices:   # allocated now, not inside a captured step
            self.muon.state[m]["momentum_buffer"] = torch.zeros_like(m)
        # TrainStep points "lr" at a device tensor filled with its LR x lr_mult.
        self.muon_group = {"params": weights, "lr": cfg.muon_lr * lr / peak, "lr_mult": cfg.muon_lr / peak}
        self.found_inf = None

    @property
    def param_groups(self) -> List[dict]:
        return self.sgd.param_groups + [self.muon_group]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none=set_to_none)
        for w in self.weights:
            if set_to_none:
                w.grad = None
            elif w.grad is not None:
                w.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        self.sgd.found_inf = self.found_inf
        self.sgd.step()
        live = [(w, m) for w, m in zip(self.weights, self.matrices) if w.grad is not None]
        if not live:
            return
        self._view_weights()   # again: moving the model (.to) gives its weights new memory
        for w, m in live:
            m.grad = _as_matrix(w.grad)
        matrices = [m for _, m in live]
        buffers = [self.muon.state[m]["momentum_buffer"] for m in matrices]
        before, buffers_before = [m.clone() for m in matrices], [b.clone() for b in buffers]
        self.muon.step()
        lr = self.muon_group["lr"]
        if not isinstance(lr, torch.Tensor):
            lr = torch.tensor(lr, device=matrices[0].device)
        # weight = before + lr * (what Muon did at lr 1): Muon's own formula at that lr.
        stepped = torch._foreach_add(before, torch._foreach_mul(torch._foreach_sub(matrices, before), lr))
        bad = (self.found_inf > 0) if self.found_inf is not None else torch.zeros((), dtype=torch.bool,
                                                                                   device=lr.device)
        for m, new, old in zip(matrices, stepped, before):
            m.copy_(torch.where(bad, old, new))
        for b, old in zip(buffers, buffers_before):
            b.copy_(torch.where(bad, old, b))
        for m in matrices:
            m.grad = None

    def _view_weights(self) -> None:
        for w, m in zip(self.weights, self.matrices):
            m.data = _as_matrix(w.detach())
            if m.data_ptr() != w.data_ptr():
                raise UserError(f"train.optimizer=muon: a {tuple(w.shape)} conv weight is laid out in memory so that "
                                "it cannot be viewed as a matrix; use train.optimizer=sgd")

    def state_dict(self) -> dict:
        return {"sgd": self.sgd.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sgd.load_state_dict(state["sgd"])
        self.muon.load_state_dict(state["muon"])
