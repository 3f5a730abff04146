"""LR range test: train from a fresh model while the learning rate grows exponentially
from `start` to `end` over a few hundred steps, follow the smoothed loss, stop when it
diverges, and suggest a peak LR for OneCycle.

It runs the trainer's own step (precision, channels_last, DDP under a launcher, the
configured optimizer and augmentation), so the suggestion fits the run it is for. Under
torchrun every rank sees the loss averaged over ranks, so all stop at the same step.

The suggestion is the LR where the smoothed loss falls fastest (the steepest descent
against log LR, before the loss's minimum), the usual pick for OneCycle's peak.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List

import numpy as np

from .assembly import (build_optimization, build_step, build_training_model, configure_cudnn, load_data,
                       seed_everything, step_options, train_batches)
from .config import Config
from .distributed import DistContext


@dataclass
class LRFindResult:
    lrs: List[float]
    losses: List[float]          # smoothed (bias-corrected EMA of the step losses)
    suggested_lr: float          # for this run's global batch
    stopped_early: bool          # the loss diverged before the last step
    global_batch: int
    lr_reference_batch: int = 256    # train.lr's batch: the value a user types is per this many images

    @property
    def suggested_train_lr(self) -> float:
        """The suggestion as a user types it: train.lr, per `lr_reference_batch` images."""
        return self.suggested_lr * self.lr_reference_batch / self.global_batch


def lr_range_test(cfg: Config, ctx: DistContext, steps: int = 200, start: float = 1e-5, end: float = 10.0,
                  smoothing: float = 0.98, diverge_factor: float = 4.0) -> LRFindResult:
    seed_everything(cfg.seed + ctx.rank)
    # Eager: the sweep reads the loss back after every step to decide when to stop.
    train, precision = step_options(dataclasses.replace(cfg.train, cuda_graph=False, compile=False), ctx.device)
    configure_cudnn(train, ctx.device)
    model = build_training_model(cfg, ctx)   # before the data: a bad model stops at once
    data = load_data(cfg, ctx, model)
    batches = train_batches(cfg, train, data, ctx)
    step = build_step(model, build_optimization(model, train, precision, ctx, lr=start), train, precision, ctx)
    model.train()

    lrs, losses = [], []
    average, best, stopped_early = 0.0, math.inf, False
    epoch = 0
    while len(lrs) < steps and not stopped_early:
        batches.set_epoch(epoch)
        for images, labels in batches.iterate():
            i = len(lrs)
            lr = start * (end / start) ** (i / max(steps - 1, 1))
            step.set_lr(lr)
            step(images, labels)
            # The loss averaged over ranks: every rank takes the same decision.
            loss = float(ctx.sum(step.last_loss.double().view(1))[0]) / ctx.world_size
            average = smoothing * average + (1 - smoothing) * loss
            smoothed = average / (1 - smoothing ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if not math.isfinite(loss) or smoothed > diverge_factor * best:
                stopped_early = True
                break
            if len(lrs) == steps:
                break
        epoch += 1
    return LRFindResult(lrs, losses, suggest(lrs, losses), stopped_early, train.batch_size * ctx.world_size,
                        train.lr_reference_batch)


def suggest(lrs: List[float], losses: List[float]) -> float:
    """The LR of the steepest fall of the smoothed loss against log LR, before its minimum
    (the first tenth of the sweep is left out: the smoothing has not settled there)."""
    skip = max(1, len(lrs) // 10)
    lowest = int(np.argmin(losses))
    if lowest - skip < 2:
        return lrs[lowest]
    slope = np.gradient(np.asarray(losses[skip:lowest + 1]), np.log(np.asarray(lrs[skip:lowest + 1])))
    return float(lrs[skip + int(np.argmin(slope))])


def plot(result: LRFindResult):
    from .report import pyplot   # matplotlib, Agg

    fig, ax = pyplot().subplots(figsize=(6.5, 4.2))
    ax.plot(result.lrs, result.losses)
    # The line stands at the sweep's LR (this global batch); the legend gives what to type.
    ax.axvline(result.suggested_lr, color="red", ls="--",
               label=f"suggested: train.lr={result.suggested_train_lr:.3g}\n(per {result.lr_reference_batch} images; "
                     f"{result.suggested_lr:.3g} at batch {result.global_batch})")
    ax.set_xscale("log")
    ax.set_xlabel(f"learning rate (global batch {result.global_batch})")
    ax.set_ylabel("training loss (smoothed)")
    top = min(max(result.losses), 4 * min(result.losses))
    ax.set_ylim(min(result.losses) * 0.95, top * 1.05)
    ax.set_title("LR range test" + (" (stopped: the loss diverged)" if result.stopped_early else ""))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


__all__ = ["LRFindResult", "lr_range_test", "suggest", "plot"]
