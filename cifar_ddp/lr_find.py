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

from .config import Config
from .data.loaders import TrainBatches
from .data.sources import load_dataset
from .distributed import DistContext, wrap_ddp
from .engine import resolve_precision
from .optim import build_optimizer
from .step import TrainStep
from .trainer import build_training_model, class_names, seed_everything


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
    train = dataclasses.replace(cfg.train, cuda_graph=False, compile=False)
    model = build_training_model(cfg, ctx)   # before the data: a bad model stops at once
    data = load_dataset(cfg.data, seed=cfg.seed, classes=class_names(cfg))
    batches = TrainBatches(data.train, cfg.augment, data.stats, train.batch_size, ctx.rank, ctx.world_size,
                           cfg.seed, ctx.device, channels_last=train.channels_last)
    optimizer = build_optimizer(model, train, start)
    precision = resolve_precision(train.precision, ctx.device)
    step = TrainStep(wrap_ddp(model, ctx), optimizer, train, precision, ctx.device, 0, bare_model=model)
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
