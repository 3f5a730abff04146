"""The two phases of a run: train_one_epoch and evaluate.

The training loop only queues work on the device (`step.TrainStep`); the host reads
the device back at the sync steps of a `SyncPlan` - every `log_every_steps`, at
checkpoint steps, at `stop_after_steps` and at the epoch's end - and nowhere else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .data.loaders import DeviceEvalSplit, eval_batches
from .data.sources import ChannelStats, ImageSplit
from .distributed import DistContext
from .errors import NonFiniteLoss
from .step import TrainStep, autocast

# ------------------------------------------------------------------ training


@dataclass
class TrainState:
    """Where the run stands; saved in every checkpoint."""
    epoch: int = 0              # epochs fully completed
    step_in_epoch: int = 0      # steps completed inside `epoch` (mid-epoch checkpoints)
    global_step: int = 0
    best_accuracy: float = -1.0
    skipped_steps: int = 0      # non-finite steps whose update was masked (on_nonfinite=skip)
    scaler_skipped_steps: int = 0   # fp16 steps the GradScaler skipped (normal, not errors)
    # Inside an epoch: what its steps so far add up to over all ranks (loss sum, correct,
    # images, seconds), so that a run resumed there reports the whole epoch's figures.
    epoch_partial: List[float] = field(default_factory=list)
    history: List[dict] = field(default_factory=list)


@dataclass
class EpochMetrics:
    loss: float
    accuracy: float
    images: int
    seconds: float               # training only: compiling and capturing are in setup_seconds
    setup_seconds: float = 0.0
    stop_requested: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class SyncPlan:
    """The steps at which the host reads the device; between them nothing waits."""
    every: int
    checkpoint_every: int = 0
    stop_after: int = 0
    stop_on_nonfinite: bool = True

    def due(self, global_step: int) -> bool:
        return (global_step % self.every == 0
                or bool(self.checkpoint_every and global_step % self.checkpoint_every == 0)
                or global_step == self.stop_after)


class EpochMeter:
    """The sums and the clock of one epoch, over all ranks: what `train_one_epoch` reports
    at its end and what a mid-epoch checkpoint saves (TrainState.epoch_partial), so that a
    run resumed inside the epoch reports the whole epoch's figures. `carried`: the
    epoch_partial of the steps before a resume (loss sum, correct, images, seconds).
    Set-up time (first step, compiling, capturing: `TrainStep.setup_seconds`) is kept
    out of the epoch's seconds."""

    def __init__(self, step: TrainStep, ctx: DistContext, carried: Sequence[float] = ()) -> None:
        self.step, self.ctx = step, ctx
        self.carried_seconds = float(carried[3]) if carried else 0.0
        # The carried sums are global: one rank adds them, so the sum over ranks counts them once.
        step.reset_metrics(carried[:3] if ctx.is_main else ())
        self.started = time.perf_counter()
        self.setup_before = step.setup_seconds

    def setup_seconds(self) -> float:
        return self.step.setup_seconds - self.setup_before

    def seconds(self) -> float:
        return time.perf_counter() - self.started - self.setup_seconds() + self.carried_seconds

    def partial(self) -> List[float]:
        """Collective: (loss sum, correct, images, seconds) of the epoch so far, all ranks."""
        return [*self.ctx.sum(self.step.metrics()).tolist(), self.seconds()]


def train_one_epoch(
    step: TrainStep,
    batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    schedule: Callable[[int], float],
    state: TrainState,
    plan: SyncPlan,
    meter: EpochMeter,
    on_sync: Callable[[TrainState, Dict[str, float]], bool] = lambda state, read: False,
) -> EpochMetrics:
    """One pass over this rank's batches; returns the epoch's metrics summed over all ranks
    (`meter`'s, so including the steps before a resume). `schedule(global_step)` is the
    learning rate of that step (optim.LRSchedule).

    `on_sync(state, read)` runs at the plan's sync steps and at the epoch's end, with
    what the device reported (`TrainStep.read`); it returns True to stop the epoch.
    """
    step.model.train()
    stop, synced_at = False, state.global_step
    for images, labels in batches:
        step.set_lr(schedule(state.global_step))
        step(images, labels)
        state.global_step += 1
        state.step_in_epoch += 1
        if plan.due(state.global_step):
            synced_at = state.global_step
            if on_sync(state, _fold(step.read(), state, plan)):
                stop = True
                break
    if not stop and synced_at != state.global_step:
        stop = on_sync(state, _fold(step.read(), state, plan))
    loss_sum, correct, images, seconds = meter.partial()
    n = max(int(images), 1)
    return EpochMetrics(loss=loss_sum / n, accuracy=correct / n, images=int(images),
                        seconds=seconds, setup_seconds=meter.setup_seconds(), stop_requested=stop)


def _fold(read: Dict[str, float], state: TrainState, plan: SyncPlan) -> Dict[str, float]:
    """Add the device's counters to the run's, and stop on a non-finite step if asked.
    Every rank reads the same counters (they come from all-reduced gradients)."""
    state.skipped_steps += read["nonfinite_steps"]
    state.scaler_skipped_steps += read["scaler_skipped_steps"]
    if read["nonfinite_steps"] and plan.stop_on_nonfinite:
        step = read["first_nonfinite_step"]
        raise NonFiniteLoss(
            f"non-finite loss at step {step} (epoch {state.epoch + 1}); its update was not applied and "
            "training stopped. Lower train.lr, use train.precision=fp32, or set train.on_nonfinite=skip"
        )
    return read


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    correct: int
    total: int
    per_class_accuracy: List[float]
    confusion: List[List[int]] = field(default_factory=list)       # [true class][predicted class]
    # Per confidence bin (top-1 probability in [b/B, (b+1)/B)): [images, sum of confidence, correct].
    calibration: List[List[float]] = field(default_factory=list)
    # The most confident mistakes: (confidence, index in the split, true class, predicted class).
    mistakes: List[Tuple[float, int, int, int]] = field(default_factory=list)
    # With `with_tta_accuracy`: the flip-TTA accuracy, correct count and loss, scored in the
    # same forward passes as the plain figures.
    accuracy_tta: Optional[float] = None
    correct_tta: Optional[int] = None
    loss_tta: Optional[float] = None


CALIBRATION_BINS = 15


@torch.no_grad()
def evaluate(model: nn.Module, shard: ImageSplit | DeviceEvalSplit, stats: ChannelStats, ctx: DistContext,
             precision: str, num_classes: int, batch_size: int = 500,
             tta_flip: bool = False, channels_last: bool = True, keep_mistakes: int = 0,
             with_tta_accuracy: bool = False) -> EvalResult:
    """Exact metrics over the whole split: each rank scores its disjoint shard (images
    rank, rank + W, ...) and the counts (not averages) are summed over ranks: the loss, the
    confusion matrix and the calibration bins. `keep_mistakes` > 0 also returns the split's
    most confident mistakes, gathered from every rank.

    `tta_flip`: every metric from the average of the logits of each image and its mirror.
    `with_tta_accuracy`: the metrics of the plain logits, and `accuracy_tta` beside them.
    Either way an image and its mirror go through the network as one batch of
    2 x `batch_size` (one pass, not two; the model is in eval mode, so no image's result
    depends on the rest of its batch)."""
    model.eval()
    device = ctx.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    bins = torch.zeros(3, CALIBRATION_BINS, device=device, dtype=torch.float64)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    found = []
    seen = 0
    flip = tta_flip or with_tta_accuracy
    tta_correct = torch.zeros((), device=device, dtype=torch.int64)
    tta_loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for images, labels in eval_batches(shard, stats, batch_size, device):
        images = images.contiguous(memory_format=memory_format)
        with autocast(device, precision):
            if flip:
                both = model(torch.cat([images, images.flip(3)]).contiguous(memory_format=memory_format)).float()
                plain, averaged = both[:len(labels)], (both[:len(labels)] + both[len(labels):]) / 2
                logits = averaged if tta_flip else plain
                tta_correct += (averaged.argmax(1) == labels).sum()
                tta_loss_sum += F.cross_entropy(averaged, labels, reduction="sum").double()
            else:
                logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confidence, predicted = logits.softmax(1).max(1)
        hits = predicted == labels
        confusion += torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
        which = (confidence * CALIBRATION_BINS).long().clamp_(max=CALIBRATION_BINS - 1)
        for row, weights in enumerate((None, confidence.double(), hits.double())):
            bins[row] += torch.bincount(which, weights=weights, minlength=CALIBRATION_BINS).double()
        if keep_mistakes:
            wrong = torch.nonzero(~hits).flatten()
            local = (seen + wrong) * ctx.world_size + ctx.rank     # the image's index in the whole split
            found.append(torch.stack([confidence[wrong].double(), local.double(), labels[wrong].double(),
                                      predicted[wrong].double()], 1).cpu())
        seen += len(labels)
    packed = ctx.sum(torch.cat([loss_sum.view(1), confusion.double(), bins.flatten(), tta_correct.double().view(1),
                                tta_loss_sum.view(1)]))
    loss_total = float(packed[0])
    matrix = packed[1:1 + num_classes ** 2].long().view(num_classes, num_classes)
    per_class_correct = matrix.diagonal().tolist()
    per_class_total = matrix.sum(1).tolist()
    n = sum(per_class_total)
    mistakes: List[Tuple[float, int, int, int]] = []
    if keep_mistakes:
        mine = torch.cat(found) if found else torch.zeros(0, 4, dtype=torch.float64)
        mine = mine[mine[:, 0].argsort(descending=True)][:keep_mistakes].tolist()
        everyone = [row for rank_rows in ctx.gather_objects(mine) for row in rank_rows]
        everyone.sort(key=lambda row: (-row[0], row[1]))
        mistakes = [(c, int(i), int(t), int(p)) for c, i, t, p in everyone[:keep_mistakes]]
    return EvalResult(
        loss=loss_total / max(n, 1),
        accuracy=sum(per_class_correct) / max(n, 1),
        correct=sum(per_class_correct),
        total=n,
        per_class_accuracy=[c / t if t else 0.0 for c, t in zip(per_class_correct, per_class_total)],
        confusion=matrix.tolist(),
        calibration=packed[1 + num_classes ** 2:-2].view(3, CALIBRATION_BINS).t().tolist(),
        mistakes=mistakes,
        accuracy_tta=float(packed[-2]) / max(n, 1) if with_tta_accuracy else None,
        correct_tta=int(packed[-2]) if with_tta_accuracy else None,
        loss_tta=float(packed[-1]) / max(n, 1) if with_tta_accuracy else None,
    )
