"""The two phases of a run: train_one_epoch and evaluate.

Metrics are accumulated as tensors on the training device and read back once
per log interval, so the hot loop does not wait on the host every step (apart
from the finiteness check, see `StepGuard`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data.loaders import eval_batches
from .data.sources import ChannelStats, ImageSplit
from .distributed import DistContext
from .errors import UserError

# ------------------------------------------------------------------ precision


def cpu_supports_bf16() -> bool:
    checker = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((checker and checker()) or (amx and amx()))


def resolve_precision(requested: str, device: torch.device) -> str:
    """Map "auto" to what the hardware runs fast; refuse what it cannot run."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        # Without native bf16 instructions autocast to bf16 is slower than fp32 on CPU.
        return "bf16" if cpu_supports_bf16() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    return requested


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------ training


class NonFiniteLoss(UserError):
    """The loss or gradients became NaN/Inf."""


@dataclass
class TrainState:
    """Where the run stands; saved in every checkpoint."""
    epoch: int = 0              # epochs fully completed
    step_in_epoch: int = 0      # steps completed inside `epoch` (mid-epoch checkpoints)
    global_step: int = 0
    best_accuracy: float = -1.0
    skipped_steps: int = 0      # non-finite steps skipped (on_nonfinite=skip)
    scaler_skipped_steps: int = 0   # fp16 steps the GradScaler skipped (normal, not errors)
    history: List[dict] = field(default_factory=list)


@dataclass
class EpochMetrics:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    lr_for_step: Callable[[int], float],
    state: TrainState,
    cfg: TrainConfig,
    ctx: DistContext,
    precision: str,
    scaler: Optional[torch.amp.GradScaler] = None,
    ema: Optional[nn.Module] = None,
    on_step: Optional[Callable[[TrainState, dict], None]] = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> EpochMetrics:
    """One pass over this rank's batches; returns metrics summed over all ranks."""
    from .optim import set_lr

    model.train()
    device = ctx.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = torch.zeros((), device=device, dtype=torch.int64)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    started = time.perf_counter()
    for images, labels in batches:
        images = images.contiguous(memory_format=memory_format)
        lr = lr_for_step(state.global_step)
        set_lr(optimizer, lr)
        with autocast(device, precision):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scale_before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() < scale_before:
                state.scaler_skipped_steps += 1
        else:
            loss.backward()
            if not _finite_step(loss, model, state, cfg, ctx):
                state.global_step += 1
                state.step_in_epoch += 1
                continue
            optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.detach().double() * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.numel()
        state.global_step += 1
        state.step_in_epoch += 1
        if on_step is not None:
            on_step(state, {"lr": lr, "loss": loss})
        if should_stop():
            break
    totals = ctx.sum(torch.stack([loss_sum, correct.double(), seen.double()]))
    elapsed = time.perf_counter() - started
    n = max(int(totals[2].item()), 1)
    return EpochMetrics(loss=float(totals[0]) / n, accuracy=float(totals[1]) / n,
                        images=int(totals[2].item()), seconds=elapsed)


def _finite_step(loss: torch.Tensor, model: nn.Module, state: TrainState,
                 cfg: TrainConfig, ctx: DistContext) -> bool:
    """True when the loss is finite on every rank; else stop or skip, per config.

    One host sync per step: the price of never applying a NaN update. All ranks
    agree (max over ranks) so they skip or stop together and stay in lockstep.
    """
    bad = (~torch.isfinite(loss.detach())).to(torch.int32)
    if ctx.is_distributed:
        bad = ctx.max(bad)
    if not bool(bad):
        return True
    if cfg.on_nonfinite == "skip":
        state.skipped_steps += 1
        return False
    raise NonFiniteLoss(
        f"non-finite loss at step {state.global_step + 1} (epoch {state.epoch + 1}); training stopped. "
        "Lower train.lr, use train.precision=fp32, or set train.on_nonfinite=skip"
    )


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    correct: int
    total: int
    per_class_accuracy: List[float]
    per_class_total: List[int]


@torch.no_grad()
def evaluate(model: nn.Module, shard: ImageSplit, stats: ChannelStats, ctx: DistContext,
             precision: str, num_classes: int, batch_size: int = 500,
             tta_flip: bool = False, channels_last: bool = True) -> EvalResult:
    """Exact metrics over the whole split: each rank scores its disjoint shard and
    the counts (not averages) are summed over ranks."""
    model.eval()
    device = ctx.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros(num_classes, device=device, dtype=torch.int64)
    total = torch.zeros(num_classes, device=device, dtype=torch.int64)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, labels in eval_batches(shard, stats, batch_size, device):
        images = images.contiguous(memory_format=memory_format)
        with autocast(device, precision):
            logits = model(images).float()
            if tta_flip:
                logits = (logits + model(images.flip(3)).float()) / 2
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        hits = logits.argmax(1) == labels
        correct += torch.bincount(labels[hits], minlength=num_classes)
        total += torch.bincount(labels, minlength=num_classes)
    packed = ctx.sum(torch.cat([loss_sum.view(1), correct.double(), total.double()]))
    loss_total = float(packed[0])
    per_class_correct = packed[1:1 + num_classes].long().tolist()
    per_class_total = packed[1 + num_classes:].long().tolist()
    n = sum(per_class_total)
    return EvalResult(
        loss=loss_total / max(n, 1),
        accuracy=sum(per_class_correct) / max(n, 1),
        correct=sum(per_class_correct),
        total=n,
        per_class_accuracy=[c / t if t else 0.0 for c, t in zip(per_class_correct, per_class_total)],
        per_class_total=per_class_total,
    )
