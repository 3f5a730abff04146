"""Exponential moving average of a model's weights, updated without reading anything
back to the host, so it can run inside a captured training step.

`torch.optim.swa_utils.AveragedModel` asks the host `n_averaged == 0` at every update
(a device sync on a GPU); this class keeps the same state-dict layout (`module.*`,
`n_averaged`), so checkpoints written with either load into the other.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn


class WeightEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        device = next(model.parameters()).device
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long, device=device))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module, skip: Optional[torch.Tensor] = None) -> None:
        """Move the average towards `model`. The kept share warms up, (1 + n) / (10 + n) until
        it reaches `decay`: a fixed 0.999 would keep ~40% of the random initial weights after
        the first epoch, and score 10%. The first update copies. `skip` (a bool tensor) leaves
        everything as it is, for a step whose update was masked."""
        n = self.n_averaged.to(torch.float32)
        keep = torch.clamp((1.0 + n) / (10.0 + n), max=self.decay)
        keep = torch.where(n == 0, torch.zeros_like(keep), keep)
        if skip is not None:
            keep = torch.where(skip, torch.ones_like(keep), keep)
        averaged = [t for t in _tensors(self.module) if t.is_floating_point()]
        current = [t for t in _tensors(model) if t.is_floating_point()]
        # avg = keep * avg + (1 - keep) * current, as two fused list operations.
        torch._foreach_mul_(averaged, keep)
        torch._foreach_add_(averaged, torch._foreach_mul(current, 1.0 - keep))
        for target, source in zip(_tensors(self.module), _tensors(model)):
            if not target.is_floating_point():
                # Integer buffers (BN's num_batches_tracked) are counters: take the current value
                # (unless the step is skipped: then they too stay as they are).
                target.copy_(source if skip is None else torch.where(skip, target, source))
        self.n_averaged.add_(1 if skip is None else (~skip).long())


def _tensors(model: nn.Module):
    return [*model.parameters(), *model.buffers()]
