"""A training run, top to bottom: data, model, optimizer, resume, then a loop of
train_one_epoch and evaluate, with checkpoints and logs along the way."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from . import lock as out_dir_lock
from . import rules
from .config import CIFAR10_CLASSES, Config
from .data.loaders import TrainBatches, epoch_seed, eval_shard
from .data.sources import DatasetArrays, load_dataset
from .distributed import DistContext, wrap_ddp
from .ema import WeightEma
from .engine import EvalResult, NonFiniteLoss, SyncPlan, TrainState, evaluate, resolve_precision, train_one_epoch
from .errors import UserError
from .files import check_writable_folder
from .inference import probabilities
from .loggers import SilentLogger, augmented_preview, make_logger, run_hparams
from .models import build_model, plain_dilated_depthwise
from .optim import build_optimizer, lr_at, peak_lr
from .step import TrainStep, capture_stream, resolve_step_options

# How many of the most confident mistakes the end-of-training pictures show.
FIGURE_MISTAKES = 24


class Preempted(Exception):
    """Raised after a checkpoint was written in response to SIGTERM/SIGINT."""


class StopSignal:
    """Turns SIGTERM/SIGINT/SIGUSR1 into a flag the ranks agree on at the next sync step, so
    a step is never cut in half and every rank stops at the same step. SIGUSR1 is SLURM's
    warning before the time limit (`--signal=USR1@SECONDS`)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: Config, ctx: DistContext) -> DatasetArrays:
    # Rank 0 goes first so only one process downloads or decodes and fills the cache.
    if not ctx.is_main:
        ctx.barrier()
    try:
        arrays = load_dataset(cfg.data, seed=cfg.seed, classes=class_names(cfg))
    finally:
        if ctx.is_main:
            ctx.barrier()
    return arrays


def eval_split(cfg: Config) -> str:
    return "val" if cfg.data.val_size else "test"


def class_names(cfg: Config):
    if cfg.data.source == "fake":
        return tuple(f"class{i}" for i in range(cfg.model.num_classes))
    if cfg.model.num_classes != len(CIFAR10_CLASSES):
        raise UserError(f"model.num_classes={cfg.model.num_classes} but CIFAR-10 has {len(CIFAR10_CLASSES)} classes")
    return CIFAR10_CLASSES


def build_training_model(cfg: Config, ctx: DistContext) -> nn.Module:
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


def _make_ema(model: nn.Module, decay: float) -> Optional[WeightEma]:
    # BN running statistics are averaged too, so the EMA model evaluates as is.
    return WeightEma(model, decay) if decay > 0 else None


def _rank_rng_state(device: torch.device) -> Dict[str, Any]:
    # Augmentation draws follow from (seed, rank, epoch); dropout's come from these.
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rank_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """One training run. Construction builds data, model, optimizer and logger and
    resumes if asked; `fit()` runs the epochs. Every method is called on every rank
    (collectives inside); only the logger and checkpoint writes are rank-0 side effects."""

    def __init__(self, cfg: Config, ctx: DistContext, logger: Optional[SilentLogger] = None) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.out_dir = Path(cfg.out_dir)
        _refuse_to_overwrite(cfg, ctx)
        # Before loading the data: an explicit --resume that finds nothing stops at once.
        resume_from = _resume_source(cfg, ctx)
        self.resume_path = resume_from[0] if resume_from else None
        self.precision = resolve_precision(cfg.train.precision, ctx.device)
        # TrainStep does this too; here it stops a bad option before the data loads, and
        # settles cuda_graph=auto for this device (cfg.train keeps "auto", as given).
        self.t = t = resolve_step_options(cfg.train, ctx.device, self.precision)
        seed_everything(cfg.seed)
        if ctx.device.type == "cuda":
            # Fixed input shapes: let cuDNN pick the fastest kernels once.
            torch.backends.cudnn.benchmark = True
        # The network first, with its design rules checked: a mistake in either stops in
        # seconds, before the data loads. (Loading draws nothing from torch's generator, so
        # the initial weights are the same as when the model was built after the data.)
        self.model = model = build_training_model(cfg, ctx)
        rules.enforce(rules.check_rules(model, cfg.rules), cfg.rules, warn=ctx.is_main)
        slow = plain_dilated_depthwise(model) if ctx.device.type == "cpu" else []
        if slow and ctx.is_main:
            warnings.warn(f"{slow[0]}{f' (and {len(slow) - 1} more)' if len(slow) > 1 else ''} is a dilated "
                          "depthwise nn.Conv2d: on a CPU torch runs it 4-20x slower than an undilated one"
                          + (", and its bf16 kernel gives non-finite values at random with several threads"
                             if self.precision == "bf16" else "")
                          + "; build it with cifar_ddp.models.blocks.DepthwiseConv2d (same weights)", stacklevel=2)

        self.data = data = load_data(cfg, ctx)
        assert data.train is not None
        self.batches = batches = TrainBatches(data.train, cfg.augment, data.stats, t.batch_size, ctx.rank,
                                              ctx.world_size, cfg.seed, ctx.device,
                                              num_workers=cfg.data.num_workers, channels_last=t.channels_last)
        # The sampler pads the shards to one length with repeated images: each rank's own
        # images must fill a batch, or the epoch would be (partly) the padding.
        per_rank = len(data.train) // ctx.world_size
        if per_rank < t.batch_size:
            raise UserError(
                f"train.batch_size={t.batch_size} is larger than the {per_rank} training images each of the "
                f"{ctx.world_size} process(es) gets ({len(data.train)} in all); lower train.batch_size or use "
                "fewer processes"
            )
        self.test_shard = eval_shard(data.test, ctx.rank, ctx.world_size)

        self.ema = _make_ema(model, t.ema_decay)
        self.global_batch = t.batch_size * ctx.world_size
        self.peak = peak_lr(t, self.global_batch)
        self.optimizer = build_optimizer(model, t, self.peak)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        if ctx.is_main:
            _check_room_for_checkpoints(self.out_dir, model, self.ema, t)
        self.state = TrainState()
        self.total_steps = t.epochs * batches.steps_per_epoch

        if resume_from is not None:
            _resume(resume_from, ctx, model, self.ema, self.optimizer, self.scaler, self.state, batches)
        # Saves are numbered in the order written, on from the folder's and the resumed file's.
        self.save_number = max(ckpt.next_save_number(ckpt.checkpoint_dir(self.out_dir)),
                               int(resume_from[1].get("save_number", 0)) + 1 if resume_from else 1)
        # Stats and classes travel with every checkpoint so evaluation needs no training data.
        self.static = {"stats": asdict(data.stats), "classes": list(data.classes)}

        stream = capture_stream(t, ctx.device)
        self.step = TrainStep(wrap_ddp(model, ctx, stream), self.optimizer, t, self.precision, ctx.device, self.state.global_step,
                              ema=self.ema, scaler=self.scaler, bare_model=model, stream=stream)
        self.plan = SyncPlan(every=t.log_every_steps, checkpoint_every=t.checkpoint_every_steps,
                             stop_after=t.stop_after_steps, stop_on_nonfinite=t.on_nonfinite == "stop")
        self.setup_seconds = 0.0
        self._epoch_clock = (time.perf_counter(), 0.0)   # (start, set-up seconds then) of this epoch
        self._carried_seconds = 0.0

        self.logger = logger if logger is not None else make_logger(
            ctx.is_main, self.out_dir, t.progress_bar, eval_split=eval_split(cfg))
        self.stop = StopSignal()
        self.signals_received: Dict[int, int] = {}
        self.last_eval: Optional[EvalResult] = None
        self.last_saved: List[Path] = []

    def _announce(self) -> None:
        cfg, ctx, data, state = self.cfg, self.ctx, self.data, self.state
        info = {
            "world size": ctx.world_size, "device": str(ctx.device), "backend": ctx.backend or "none",
            "precision": self.precision, "global batch": self.global_batch, "peak lr": round(self.peak, 5),
            "steps/epoch": self.batches.steps_per_epoch, "train images": len(data.train),
            f"{eval_split(cfg)} images": len(data.test),
            "params": sum(p.numel() for p in self.model.parameters()), "augment": cfg.augment.backend,
            "compile": self.t.compile, "cuda graph": self.t.cuda_graph,
        }
        self.logger.start(cfg.to_dict(), info, history=state.history)
        if state.global_step == 0 and ctx.is_main:
            self.logger.images("train/augmented", augmented_preview(data, cfg), 0)
        if self.resume_path is None and _requested_resume(cfg, ctx) == "auto":
            self.logger.message(f"train.resume=auto: no checkpoint in {ckpt.checkpoint_dir(self.out_dir)} yet; "
                                "starting fresh")
        if self.resume_path is not None:
            self.logger.message(f"resumed from {self.resume_path} at epoch {state.epoch + 1}, "
                                f"step {state.step_in_epoch} of it")

    def lr_for_step(self, step: int) -> float:
        return lr_at(step / max(self.total_steps, 1), self.t, self.peak)

    def save(self, is_best: bool = False) -> None:
        """Collective: every rank contributes its RNG state, rank 0 writes."""
        ctx = self.ctx
        rank_states = ctx.gather_objects(_rank_rng_state(ctx.device))
        if 0 < self.state.step_in_epoch < self.batches.steps_per_epoch:
            started, setup_before = self._epoch_clock
            sums = ctx.sum(self.step.metrics()).tolist()
            seconds = time.perf_counter() - started - (self.step.setup_seconds - setup_before) + self._carried_seconds
            self.state.epoch_partial = [*sums, seconds]
        if ctx.is_main:
            payload = {
                "model": self.model.state_dict(),
                "architecture": ckpt.architecture_signature(self.model.state_dict()),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "train_state": asdict(self.state),
                "rank_rng": rank_states,
                "world_size": ctx.world_size,
                "global_batch": self.global_batch,
                "config": self.cfg.to_dict(),
                **self.static,
            }
            directory = ckpt.checkpoint_dir(self.out_dir)
            try:
                self.last_saved[:] = [ckpt.save(directory, payload, self.state.global_step,
                                                self.t.keep_checkpoints, is_best, self.save_number)]
            except OSError as exc:
                # The write goes to a temporary file first: the previous checkpoint is intact.
                previous = self.last_saved[0] if self.last_saved else "none"
                size = len(ckpt.encode(payload)) / 2**20
                raise UserError(f"cannot write a checkpoint in '{directory}' ({exc.strerror}); free space there "
                                f"(each checkpoint file takes {size:.1f} MB) and continue "
                                f"with --resume; the previous checkpoint is intact: {previous}") from None
        self.save_number += 1
        ctx.barrier()

    def _on_sync(self, st: TrainState, read: Dict[str, float]) -> bool:
        """At the sync steps only (engine.SyncPlan): log, checkpoint, and decide whether to stop."""
        t = self.t
        _inject_test_fault(st.global_step, self.ctx)
        if st.global_step % t.log_every_steps == 0:
            self.logger.step(st.global_step, {"train/step_loss": read["loss"],
                                              "lr": self.lr_for_step(st.global_step - 1)})
        if t.checkpoint_every_steps and st.global_step % t.checkpoint_every_steps == 0 \
                and st.step_in_epoch < self.batches.steps_per_epoch:
            self.save()
        return self._should_stop()

    def _should_stop(self) -> bool:
        t = self.t
        if t.stop_after_steps and self.state.global_step >= t.stop_after_steps:
            return True  # the same on every rank: no need to ask the others
        # Signals reach the ranks at different steps: they agree at this sync step, and
        # every rank learns which rank got which signal (for the message).
        received = torch.zeros(self.ctx.world_size, dtype=torch.int64, device=self.ctx.device)
        received[self.ctx.rank] = self.stop.received or 0
        agreed = self.ctx.max(received).tolist()
        self.signals_received = {rank: signum for rank, signum in enumerate(agreed) if signum}
        return bool(self.signals_received)

    def _interrupt(self) -> None:
        reason = _stop_reason(self.signals_received, self.ctx.world_size, self.t.stop_after_steps)
        self.logger.message(f"{reason} at step {self.state.global_step}; checkpoint in "
                            f"{ckpt.checkpoint_dir(self.out_dir)}; continue with train.resume=auto")
        raise Preempted()

    def _train_epoch(self):
        t, state, batches = self.t, self.state, self.batches
        epoch = state.epoch
        augment = epoch < t.epochs - self.cfg.augment.plain_last_epochs
        start_step = state.step_in_epoch
        batches.set_epoch(epoch, augment=augment)
        # Inside an epoch the dropout stream was restored from the checkpoint.
        if start_step == 0:
            torch.manual_seed(epoch_seed(self.cfg.seed, self.ctx.rank, epoch) + 1)
        stream = self.logger.progress(batches.iterate(start_step), total=batches.steps_per_epoch,
                                      desc=f"epoch {epoch + 1}/{t.epochs}", initial=start_step,
                                      images_per_step=self.global_batch, run_step=state.global_step,
                                      run_steps=self.total_steps)
        carried = list(state.epoch_partial) if start_step else []
        self._epoch_clock = (time.perf_counter(), self.step.setup_seconds)
        self._carried_seconds = carried[3] if carried else 0.0
        try:
            metrics = train_one_epoch(self.step, stream, self.lr_for_step, state, self.plan, self.ctx,
                                      on_sync=self._on_sync, carried=carried)
        except NonFiniteLoss as exc:
            good = self.last_saved[0] if self.last_saved else self.resume_path
            where = (f"last good checkpoint: {good} (continue from it with train.resume=auto)" if good else
                     "no checkpoint was written before it (start again with the change)")
            raise NonFiniteLoss(f"{exc}; {where}") from None
        state.epoch_partial = []
        if metrics.setup_seconds:
            self.setup_seconds += metrics.setup_seconds
            self.logger.message(f"set-up (first step, compiling, capturing) took {metrics.setup_seconds:.1f}s "
                                "(not counted in the epoch's time)")
        return metrics

    def _evaluate(self, metrics) -> Dict[str, Any]:
        t, ctx, state = self.t, self.ctx, self.state
        ctx.average_buffers(self.model)
        if self.ema is not None:
            ctx.average_buffers(self.ema)
        eval_model = self.ema.module if self.ema is not None else self.model
        num_classes = self.cfg.model.num_classes
        # The last epoch, and every figures_every_epochs, also draws pictures (TensorBoard).
        draw = state.epoch == t.epochs or (t.figures_every_epochs and state.epoch % t.figures_every_epochs == 0)
        self.last_eval = evaluate(eval_model, self.test_shard, self.data.stats, ctx, self.precision, num_classes,
                                  channels_last=t.channels_last, keep_mistakes=FIGURE_MISTAKES if draw else 0)
        if draw and ctx.is_main:
            test = self.data.test
            self.logger.figures(state.global_step, self.data.classes, self.last_eval.confusion,
                                self.last_eval.mistakes, test.images, test.labels,
                                probabilities(eval_model, test.images, self.data.stats, ctx.device))
        row = {
            "global_step": state.global_step,
            "lr": self.lr_for_step(state.global_step - 1),
            "train/loss": metrics.loss, "train/accuracy": metrics.accuracy,
            "test/loss": self.last_eval.loss, "test/accuracy": self.last_eval.accuracy,
            "epoch_seconds": metrics.seconds,
            "throughput/images_per_s": metrics.images_per_second,
        }
        if t.tta_flip:
            row["test/accuracy_tta"] = evaluate(eval_model, self.test_shard, self.data.stats, ctx, self.precision,
                                                num_classes, tta_flip=True,
                                                channels_last=t.channels_last).accuracy
        if state.scaler_skipped_steps or state.skipped_steps:
            # Logged, not raised: fp16 loss-scale backoffs are routine.
            row["skipped_steps"] = state.skipped_steps
            row["scaler_skipped_steps"] = state.scaler_skipped_steps
            self.logger.message(f"skipped steps so far: {state.skipped_steps} non-finite, "
                                f"{state.scaler_skipped_steps} by the fp16 GradScaler")
        return row

    def fit(self) -> Dict[str, Any]:
        """Train to the last epoch; returns the final metrics (on every rank)."""
        t, state = self.t, self.state
        self._announce()
        with self.stop:
            while state.epoch < t.epochs:
                metrics = self._train_epoch()
                if state.step_in_epoch < self.batches.steps_per_epoch:
                    self.save()
                    self._interrupt()
                state.epoch += 1
                state.step_in_epoch = 0
                row = self._evaluate(metrics)
                assert self.last_eval is not None
                is_best = self.last_eval.accuracy > state.best_accuracy
                state.best_accuracy = max(state.best_accuracy, self.last_eval.accuracy)
                state.history.append({k: v for k, v in row.items()} | {"epoch": state.epoch})
                self.logger.epoch(state.epoch, t.epochs, row)
                self.save(is_best=is_best)
                if state.epoch < t.epochs and (metrics.stop_requested or self._should_stop()):
                    self._interrupt()
        return self._finish()

    def _finish(self) -> Dict[str, Any]:
        last = self.state.history[-1]
        final = {
            "test_accuracy": last["test/accuracy"],
            "test_loss": last["test/loss"],
            "best_test_accuracy": self.state.best_accuracy,
            "train_accuracy": last["train/accuracy"],
        }
        if "test/accuracy_tta" in last:
            final["test_accuracy_tta"] = last["test/accuracy_tta"]
        self.logger.finish(run_hparams(self.cfg, self.ctx.world_size), final, self.state.history)
        # DDP keeps replicas identical by construction; the digests let anyone check it.
        digests = self.ctx.gather_objects(weights_digest(self.model))
        # The keys say test_ for both splits (a stable interface); `evaluated_on` says which.
        return {**final, "evaluated_on": eval_split(self.cfg), "epochs": self.state.epoch,
                "setup_seconds": round(self.setup_seconds, 2),
                "global_step": self.state.global_step, "world_size": self.ctx.world_size, "replica_digests": digests,
                "per_class_accuracy": self.last_eval.per_class_accuracy if self.last_eval else None}


def run(cfg: Config, ctx: DistContext, logger: Optional[SilentLogger] = None) -> Dict[str, Any]:
    """Train as `cfg` says; returns the final metrics (on every rank). Rank 0, which writes
    everything, holds out_dir for the whole run (lock.hold): no other run can write there."""
    held = None
    if ctx.is_main:  # find out now, not after loading the data
        check_writable_folder(Path(cfg.out_dir), "out_dir")
        held = out_dir_lock.hold(Path(cfg.out_dir))
    try:
        return Trainer(cfg, ctx, logger).fit()
    finally:
        if held is not None:
            held.release()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in state_dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _inject_test_fault(global_step: int, ctx: DistContext) -> None:
    """Fault injection for the recovery tests: CIFAR_DDP_TEST_SIGKILL="RANK:STEP" makes
    that rank SIGKILL itself after that step, in the first attempt only;
    CIFAR_DDP_TEST_SIGNAL="RANK:STEP:SIGTERM" sends it that signal instead. Unset in real runs."""
    for variable in ("CIFAR_DDP_TEST_SIGKILL", "CIFAR_DDP_TEST_SIGNAL"):
        spec = os.environ.get(variable)
        if not spec or ctx.restart_count:
            continue
        kill_rank, kill_step, *name = spec.split(":")
        if ctx.rank == int(kill_rank) and global_step == int(kill_step):
            os.kill(os.getpid(), signal.Signals[name[0]] if name else signal.SIGKILL)


def _stop_reason(signals_received: Dict[int, int], world_size: int, stop_after_steps: int) -> str:
    """`signals_received`: rank -> the signal it got, as the ranks agreed at a sync step."""
    if not signals_received:
        return f"stopped as asked by train.stop_after_steps={stop_after_steps}"
    names = " and ".join(sorted({signal.Signals(s).name for s in signals_received.values()}))
    if world_size == 1:
        return f"stopped by {names}"
    ranks = sorted(signals_received)
    return (f"stopped by {names}, sent to rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
            + (" (the others stopped with it)" if len(ranks) < world_size else ""))


def _requested_resume(cfg: Config, ctx: DistContext) -> str:
    if not cfg.train.resume and ctx.restart_count > 0:
        # torchrun restarted the group after a worker died: pick up where it left off.
        return "auto"
    return cfg.train.resume


def checkpoint_size(model: nn.Module, ema: Optional[nn.Module], t) -> int:
    """About the bytes of one checkpoint file: the weights, the EMA's, the optimizer's
    per-weight state (SGD's momentum, AdamW's two moments); the rest is small."""
    def size(tensors) -> int:
        return sum(x.numel() * x.element_size() for x in tensors)
    per_weight = 2 if t.optimizer == "adamw" else 1 if t.momentum > 0 else 0
    return (size(model.state_dict().values()) + (size(ema.state_dict().values()) if ema is not None else 0)
            + per_weight * size(model.parameters()) + 64 * 1024)


def _check_room_for_checkpoints(out_dir: Path, model: nn.Module, ema: Optional[nn.Module], t) -> None:
    """A disk too full for the first checkpoints stops the run before it trains, not after."""
    import shutil

    size = checkpoint_size(model, ema, t)
    need = 3 * size                                     # a step file, last.pt and best.pt
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise UserError(f"out_dir '{out_dir}' has {free / 2**20:.1f} MB free; this run's first checkpoints need "
                        f"about {need / 2**20:.1f} MB ({size / 2**20:.1f} MB each: a step file, last.pt and best.pt); "
                        "free space there or pick another out_dir=...")


def _refuse_to_overwrite(cfg: Config, ctx: DistContext) -> None:
    """A fresh run in a folder holding another run's checkpoints would mix the two: its
    early step files would be pruned as older than the earlier run's, and a later
    resume=auto would pick the wrong run."""
    if _requested_resume(cfg, ctx):
        return
    directory = ckpt.checkpoint_dir(cfg.out_dir)
    found = bool(ckpt.resume_candidates(directory))
    # Decided together, so that no rank is left waiting in a collective for one that stopped.
    if ctx.max(torch.tensor(float(found), device=ctx.device)).item() > 0:
        raise UserError(
            f"out_dir '{cfg.out_dir}' already holds checkpoints of an earlier run; continue it with "
            f"--resume (train.resume=auto), or start afresh in another out_dir=..., or delete '{directory}'"
        )


def _resume_source(cfg: Config, ctx: DistContext) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The checkpoint to continue from, loaded and checked once, or None to start fresh."""
    resume = _requested_resume(cfg, ctx)
    if not resume:
        return None
    if resume in ("auto", "latest"):
        directory = ckpt.checkpoint_dir(cfg.out_dir)
        found = ckpt.find_resumable(directory)
        if found:
            return found
        if resume == "latest":
            raise UserError(f"--resume found no checkpoint to continue in '{directory}'; check out_dir "
                            f"(it is '{cfg.out_dir}'), or leave out --resume to start a new run there")
        return None
    path = Path(resume)
    if path.is_dir():
        raise UserError(f"train.resume='{resume}' is a folder; pass a checkpoint file in it, e.g. "
                        f"train.resume={path / 'last.pt'}, or train.resume=auto for the newest one of out_dir")
    if not path.is_file():
        raise UserError(f"train.resume='{resume}' does not exist; pass a checkpoint file or train.resume=auto")
    return path, ckpt.load_file(path)


def _resume(source: Tuple[Path, Dict[str, Any]], ctx: DistContext, model: nn.Module, ema: Optional[nn.Module],
            optimizer: torch.optim.Optimizer, scaler, state: TrainState, batches: TrainBatches) -> None:
    path, payload = source
    ckpt.check_architecture(payload, model.state_dict(), str(path))
    model.load_state_dict(payload["model"])
    if ema is not None and payload.get("ema") is not None:
        ema.load_state_dict(payload["ema"])
    optimizer.load_state_dict(payload["optimizer"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    saved = payload["train_state"]
    for key, value in saved.items():
        setattr(state, key, value)
    old_world, old_batch = payload["world_size"], payload["global_batch"]
    new_batch = batches.batch_size * ctx.world_size
    if old_world != ctx.world_size or old_batch != new_batch:
        # Another world size splits epochs into another number of steps: continue at
        # the same share of the epoch (the schedule follows global_step, so recompute it).
        # Augmentation and dropout draws of the rest of a split epoch differ from the original.
        done_images = state.step_in_epoch * old_batch
        state.step_in_epoch = min(done_images // new_batch, batches.steps_per_epoch - 1) if done_images else 0
        state.global_step = state.epoch * batches.steps_per_epoch + state.step_in_epoch
        return
    if state.step_in_epoch:
        _restore_rank_rng_state(payload["rank_rng"][ctx.rank], ctx.device)
    # At an epoch boundary every random stream is re-derived from (seed, rank, epoch).


__all__ = ["run", "Trainer", "Preempted", "build_training_model", "class_names"]
