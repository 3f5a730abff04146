"""Averages of a model's weights, updated without reading anything back to the host, so
that they can run inside a captured training step:

- `WeightEma`, an exponential moving average evaluated instead of the raw weights
  (train.ema_decay);
- `Lookahead`, airbench's lookahead (train.lookahead_every_steps): every k steps an
  average moves towards the model and the model continues from the average.

Two classes, one arithmetic (`_blend`): they keep different averages for different
purposes (one is scored, the other is trained from), and both can be on at once, so
neither is a mode of the other.

`torch.optim.swa_utils.AveragedModel` asks the host `n_averaged == 0` at every update
(a device sync on a GPU); `WeightEma` keeps the same state-dict layout (`module.*`,
`n_averaged`), so checkpoints written with either load into the other.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import nn


class WeightEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = _frozen_copy(model)
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
        everything as it is, for a step whose update was masked. Parameters the model does not
        train keep the values they had when the EMA was made (`_trained_pairs`)."""
        n = self.n_averaged.to(torch.float32)
        keep = torch.clamp((1.0 + n) / (10.0 + n), max=self.decay)
        keep = torch.where(n == 0, torch.zeros_like(keep), keep)
        if skip is not None:
            keep = torch.where(skip, torch.ones_like(keep), keep)
        _blend(*_trained_pairs(self.module, model), keep)
        for target, source in zip(_tensors(self.module), _tensors(model)):
            if not target.is_floating_point():
                # Integer buffers (BN's num_batches_tracked) are counters: take the current value
                # (unless the step is skipped: then they too stay as they are).
                target.copy_(source if skip is None else torch.where(skip, target, source))
        self.n_averaged.add_(1 if skip is None else (~skip).long())


class Lookahead(nn.Module):
    """airbench's lookahead-EMA. Every `every` steps (k) the average moves towards the model,
    keeping decay**k x progress**3 of itself (progress = step / total_steps: early on the
    average follows the model, late in the run it holds on), and then the model's weights
    and BN statistics are set to the average, so training continues from the averaged
    point; in between the model follows the optimizer alone. The run's last step copies the
    average into the model (airbench's final update with decay 1). Parameters the model does
    not train are left out (`_trained_pairs`).

    Whether a step fires is decided on the device from the step counter (`step % k`), so a
    captured graph is the same every step: every step runs the same kernels, and a step
    that does not fire blends with a kept share of exactly 1 and copies with a share of 0."""

    def __init__(self, model: nn.Module, every: int, decay: float, total_steps: int) -> None:
        super().__init__()
        if every < 1 or total_steps < 1:
            raise ValueError(f"Lookahead needs every >= 1 and total_steps >= 1, got {every} and {total_steps}")
        # airbench starts the average at the initial weights.
        self.module = _frozen_copy(model)
        self.every, self.total_steps = every, total_steps
        self.decay_per_update = decay ** every

    @torch.no_grad()
    def update(self, model: nn.Module, step: torch.Tensor, skip: Optional[torch.Tensor] = None) -> None:
        """After the optimizer's update of step `step` (a device integer: steps done, this
        one included, the count the LR schedule follows). `skip` (a bool tensor, the step's
        update was masked) leaves the average and the model as they are, except that the
        run's last step still copies the average in (the masked step changed no weight, so
        the copy is the one the run would end on); the step still counts, as it does for the
        LR schedule, so the ramp and the every-k beat stay those of the run."""
        blends = step % self.every == 0
        if skip is not None:
            blends = blends & ~skip
        fires = blends | (step == self.total_steps)
        progress = torch.clamp(step.to(torch.float64) / self.total_steps, max=1.0)
        ramped = (self.decay_per_update * progress ** 3).to(torch.float32)
        # On the beat: the ramped share; otherwise 1 (the last step: copy back only).
        keep = torch.where(blends, ramped, torch.ones_like(ramped))
        averaged, current = _trained_pairs(self.module, model)
        _blend(averaged, current, keep)
        # model = (1 - take) * model + take * average with take 0 or 1: exactly one or the
        # other (the weights are finite: a non-finite update is never applied).
        take = fires.to(torch.float32)
        torch._foreach_mul_(current, 1.0 - take)
        torch._foreach_add_(current, torch._foreach_mul(averaged, take))


def _blend(averaged: List[torch.Tensor], current: List[torch.Tensor], keep: torch.Tensor) -> None:
    """averaged = keep * averaged + (1 - keep) * current, as two fused list operations
    (`keep`: a 0-dim device tensor; 1 leaves `averaged` exactly as it is)."""
    torch._foreach_mul_(averaged, keep)
    torch._foreach_add_(averaged, torch._foreach_mul(current, 1.0 - keep))


def _frozen_copy(model: nn.Module) -> nn.Module:
    copied = copy.deepcopy(model)
    for param in copied.parameters():
        param.requires_grad_(False)
    return copied


def _tensors(model: nn.Module):
    return [*model.parameters(), *model.buffers()]


def _trained_pairs(average: nn.Module, model: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The average's and the model's floating tensors, leaving out the parameters the model
    does not train (frozen BN gains, a frozen whitening stem): blending a constant with itself
    is not exact in floating point, so a frozen weight would drift by rounding (and the
    lookahead would copy the drift back into the model)."""
    # Weights and BN running statistics; integer counters (num_batches_tracked) are not averaged.
    trained = [p.requires_grad for p in model.parameters()] + [True for _ in model.buffers()]
    pairs = [(a, c) for a, c, keep in zip(_tensors(average), _tensors(model), trained)
             if keep and c.is_floating_point()]
    return [a for a, _ in pairs], [c for _, c in pairs]
