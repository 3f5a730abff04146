"""The parts of a run, built one way for every caller that trains: the trainer, the LR
range test (lr_find.py) and the benchmarks (benchmarks/throughput.py). Built in the order a
run needs them: the step options (refusing what this device cannot run) and the network
(its design rules checked by the caller) before the data, so a mistake stops in seconds;
then the data (rank 0 first), the whitening stem's filters from it (model.whiten_stem),
the per-rank batches, the optimizer with its scaler, EMA and lookahead, and the step that
trains on them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from .config import CIFAR10_CLASSES, Config, TrainConfig
from .data.loaders import TrainBatches
from .data.sources import DatasetArrays, load_dataset
from .data.transforms import normalize_batch
from .distributed import DistContext, wrap_ddp
from .ema import Lookahead, WeightEma
from .errors import UserError
from .models import build_model
from .models.whitening import PatchMoments, whitening_stems
from .optim import build_optimizer, peak_lr
from .step import TrainStep, capture_stream, resolve_precision, resolve_step_options


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_options(train: TrainConfig, device: torch.device) -> Tuple[TrainConfig, str]:
    """(train options with `cuda_graph: auto` settled for this device, the precision):
    what cannot run here is refused now, before anything is built."""
    precision = resolve_precision(train.precision, device)
    return resolve_step_options(train, device, precision), precision


def eval_split(cfg: Config) -> str:
    """The split a run scores: "val" when data.val_size carves it out of the training
    images (a recipe tuned on it must not be reported as a test figure), else "test"."""
    return "val" if cfg.data.val_size else "test"


def class_names(cfg: Config) -> Tuple[str, ...]:
    if cfg.data.source == "fake":
        return tuple(f"class{i}" for i in range(cfg.model.num_classes))
    if cfg.model.num_classes != len(CIFAR10_CLASSES):
        raise UserError(f"model.num_classes={cfg.model.num_classes} but CIFAR-10 has {len(CIFAR10_CLASSES)} classes")
    return CIFAR10_CLASSES


def configure_cudnn(train: TrainConfig, device: torch.device) -> None:
    """cuDNN's autotuning as train.cudnn_benchmark(_limit) say (CUDA only): with fixed input
    shapes it can try the convolution algorithms once and keep the fastest."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = train.cudnn_benchmark
        torch.backends.cudnn.benchmark_limit = train.cudnn_benchmark_limit


def build_training_model(cfg: Config, ctx: DistContext) -> nn.Module:
    """The network on this rank's device, with SyncBN and channels_last as configured."""
    model = build_model(cfg)
    if cfg.train.sync_bn and ctx.is_distributed and ctx.device.type != "cuda":
        # torch's SyncBatchNorm has CUDA kernels only: DDP would refuse it with a traceback.
        raise UserError("train.sync_bn=true needs CUDA GPUs (torch's SyncBatchNorm has no CPU kernels); "
                        "leave it off on a CPU: train.sync_bn=false")
    if cfg.train.sync_bn and ctx.is_distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_data(cfg: Config, ctx: DistContext, model: nn.Module) -> DatasetArrays:
    """The training and evaluation splits. Rank 0 goes first, so only one process
    downloads or decodes and fills the cache; the others then read it. What the network
    takes from the data is set here too, so every caller (trainer, LR range test,
    benchmarks) trains the same network: the whitening stem's filters (model.whiten_stem),
    before the EMA, the lookahead and DDP copy the model."""
    if not ctx.is_main:
        ctx.barrier()
    try:
        arrays = load_dataset(cfg.data, seed=cfg.seed, classes=class_names(cfg))
    finally:
        if ctx.is_main:
            ctx.barrier()
    fit_whitening_stem(model, arrays, ctx)
    return arrays


# Images per chunk when the whitening stem's patch statistics are summed (float64 patches
# of 512 images: about 47 MB).
WHITENING_CHUNK = 512


def fit_whitening_stem(model: nn.Module, data: DatasetArrays, ctx: Optional[DistContext] = None) -> None:
    """model.whiten_stem: set the frozen stem's filters from the 2x2 patches of the training
    split (after the val carve), normalised as the network sees them. Called once the data
    is loaded (load_data), before the EMA, the lookahead and DDP copy the model. Every rank
    sums the same images, and then takes rank 0's filters (`ctx`): a reduction order or an
    eigensolver differing in the last bit would otherwise leave each rank's EMA and
    lookahead copies of the frozen stem its own. A model without the stem is left as it is."""
    stems = whitening_stems(model)
    if not stems:
        return
    assert data.train is not None
    device = next(model.parameters()).device
    moments = PatchMoments(stems[0].patch)
    images = data.train.images
    for start in range(0, len(images), WHITENING_CHUNK):
        chunk = torch.from_numpy(images[start:start + WHITENING_CHUNK]).to(device)
        moments.add(normalize_batch(chunk, data.stats))
    mean, covariance = moments.result()
    for stem in stems:
        stem.fit(mean, covariance)
        if ctx is not None:
            for tensor in (*stem.parameters(), *stem.buffers()):
                ctx.broadcast_(tensor.data)


def train_batches(cfg: Config, train: TrainConfig, data: DatasetArrays, ctx: DistContext) -> TrainBatches:
    """This rank's augmented training batches (`train`: as step_options returns it)."""
    assert data.train is not None
    # The sampler pads the shards to one length with repeated images: each rank's own
    # images must fill a batch, or the epoch would be (partly) the padding.
    per_rank = len(data.train) // ctx.world_size
    if per_rank < train.batch_size:
        raise UserError(
            f"train.batch_size={train.batch_size} is larger than the {per_rank} training images each of the "
            f"{ctx.world_size} process(es) gets ({len(data.train)} in all); lower train.batch_size or use "
            "fewer processes"
        )
    return TrainBatches(data.train, cfg.augment, data.stats, train.batch_size, ctx.rank, ctx.world_size,
                        cfg.seed, ctx.device, num_workers=cfg.data.num_workers, channels_last=train.channels_last,
                        num_classes=cfg.model.num_classes)


@dataclass
class Optimization:
    """What updates the weights: the optimizer at the run's peak LR, fp16's GradScaler,
    the weight EMA and the lookahead (each None when off)."""
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    ema: Optional[WeightEma]
    peak_lr: float
    global_batch: int
    lookahead: Optional[Lookahead] = None


def build_optimization(model: nn.Module, train: TrainConfig, precision: str, ctx: DistContext,
                       lr: Optional[float] = None, total_steps: Optional[int] = None) -> Optimization:
    """`lr`: the optimizer's initial LR (default: the peak, by linear scaling of train.lr).
    `total_steps`: the run's steps, which the lookahead's ramp follows; the LR range test
    passes none and sweeps without the lookahead (pulling the weights back every k steps
    would hide the divergence it looks for)."""
    global_batch = train.batch_size * ctx.world_size
    peak = peak_lr(train, global_batch)
    optimizer = build_optimizer(model, train, peak if lr is None else lr, peak=peak)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    # BN running statistics are averaged too, so the EMA model evaluates as is.
    ema = WeightEma(model, train.ema_decay) if train.ema_decay > 0 else None
    lookahead = None
    if train.lookahead_every_steps and total_steps:
        lookahead = Lookahead(model, train.lookahead_every_steps, train.lookahead_decay, total_steps)
    return Optimization(optimizer, scaler, ema, peak, global_batch, lookahead)


def build_step(model: nn.Module, optimization: Optimization, train: TrainConfig, precision: str,
               ctx: DistContext, first_step: int = 0) -> TrainStep:
    """The training step over `model` (the bare module; DDP-wrapped here, on the side
    stream a captured step needs). `train`: as step_options returns it."""
    stream = capture_stream(train, ctx.device)
    return TrainStep(wrap_ddp(model, ctx, stream), optimization.optimizer, train, precision, ctx.device, first_step,
                     ema=optimization.ema, scaler=optimization.scaler, bare_model=model, stream=stream,
                     lookahead=optimization.lookahead)


__all__ = ["Optimization", "build_optimization", "build_step", "build_training_model", "class_names",
           "configure_cudnn", "eval_split", "fit_whitening_stem", "load_data",
           "seed_everything", "step_options", "train_batches"]
