"""A training run, top to bottom: data, model, optimizer, resume, then a loop of
train_one_epoch and evaluate, with checkpoints and logs along the way."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from . import checkpoint as ckpt
from . import lock as out_dir_lock
from . import resume, rules
from .assembly import (build_optimization, build_step, build_training_model, configure_cudnn, eval_split,
                       load_data, seed_everything, step_options, train_batches)
from .config import Config
from .data.loaders import DeviceEvalSplit, epoch_seed, eval_shard
from .data.mixing import mixing_enabled
from .distributed import DistContext
from .engine import EpochMeter, EvalResult, SyncPlan, TrainState, evaluate, train_one_epoch
from .errors import NonFiniteLoss, Preempted, UserError
from .files import check_writable_folder
from .inference import probabilities
from .loggers import RunLogger, augmented_preview, make_logger, run_hparams
from .models import native_dilated_depthwise, plain_dilated_depthwise
from .optim import LRSchedule
from .timing import PhaseClock

# How many of the most confident mistakes the end-of-training pictures show.
FIGURE_MISTAKES = 24


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


class Trainer:
    """One training run. Construction builds data, model, optimizer and logger and
    resumes if asked; `fit()` runs the epochs. Every method is called on every rank
    (collectives inside); only the logger and checkpoint writes are rank-0 side effects."""

    def __init__(self, cfg: Config, ctx: DistContext, logger: Optional[RunLogger] = None,
                 clock: Optional[PhaseClock] = None) -> None:
        self.clock = clock if clock is not None else PhaseClock()
        with self.clock.phase("build"):
            self._build(cfg, ctx, logger)

    def _build(self, cfg: Config, ctx: DistContext, logger: Optional[RunLogger]) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.out_dir = Path(cfg.out_dir)
        resume.refuse_to_overwrite(cfg, ctx)
        # Before loading the data: an explicit --resume that finds nothing stops at once.
        source = resume.find_source(cfg, ctx)
        self.resume_path = source[0] if source else None
        # The train options with cuda_graph=auto settled for this device (cfg.train keeps
        # "auto", as given); a bad option stops here, before the data loads.
        self.options, self.precision = options, precision = step_options(cfg.train, ctx.device)
        seed_everything(cfg.seed)
        configure_cudnn(options, ctx.device)
        # The network first, with its design rules checked: a mistake in either stops in
        # seconds, before the data loads. (Loading draws nothing from torch's generator, so
        # the initial weights are the same as when the model was built after the data.)
        self.model = model = build_training_model(cfg, ctx)
        rules.enforce(rules.check_rules(model, cfg.rules), cfg.rules, warn=ctx.is_main)
        _warn_of_slow_depthwise(model, ctx, precision)

        with self.clock.phase("data"):
            self.data = data = load_data(cfg, ctx, model)   # (fits model.whiten_stem's filters too)
            self.batches = batches = train_batches(cfg, options, data, ctx)
            # Normalised once and kept on the device: it is scored again and again.
            self.test_shard = DeviceEvalSplit(eval_shard(data.test, ctx.rank, ctx.world_size), data.stats, ctx.device)
        total_steps = options.epochs * batches.steps_per_epoch   # the LR schedule's and the lookahead's
        self.optimization = build_optimization(model, options, precision, ctx, total_steps=total_steps)
        self.ema = self.optimization.ema
        if ctx.is_main:
            _check_room_for_checkpoints(self.out_dir, model, (self.ema, self.optimization.lookahead), options)
        self.state = TrainState()
        self.schedule = LRSchedule(options, self.optimization.peak_lr, total_steps)

        if source is not None:
            resume.restore(source, ctx, model, self.optimization, self.state, batches)
        # Saves are numbered in the order written, on from the folder's and the resumed file's.
        self.save_number = max(ckpt.next_save_number(ckpt.checkpoint_dir(self.out_dir)),
                               int(source[1].get("save_number", 0)) + 1 if source else 1)
        # Stats and classes travel with every checkpoint so evaluation needs no training data.
        self.static = {"stats": asdict(data.stats), "classes": list(data.classes)}

        self.step = build_step(model, self.optimization, options, precision, ctx, self.state.global_step)
        self.plan = SyncPlan(every=options.log_every_steps, checkpoint_every=options.checkpoint_every_steps,
                             stop_after=options.stop_after_steps, stop_on_nonfinite=options.on_nonfinite == "stop")
        self.setup_seconds = 0.0
        self.meter: Optional[EpochMeter] = None      # the epoch in progress

        self.logger = logger if logger is not None else make_logger(
            ctx.is_main, self.out_dir, options.progress_bar, eval_split=eval_split(cfg),
            tensorboard=options.tensorboard, figures=options.figures)
        self.stop = StopSignal()
        self.signals_received: Dict[int, int] = {}
        self.last_eval: Optional[EvalResult] = None
        # Rank 0 writes checkpoints on a worker thread while training goes on.
        self.saver = ckpt.BackgroundSaver()

    def _announce(self) -> None:
        cfg, ctx, data, state = self.cfg, self.ctx, self.data, self.state
        info = {
            "world size": ctx.world_size, "device": str(ctx.device), "backend": ctx.backend or "none",
            "precision": self.precision, "global batch": self.optimization.global_batch,
            "peak lr": round(self.optimization.peak_lr, 5),
            "steps/epoch": self.batches.steps_per_epoch, "train images": len(data.train),
            f"{eval_split(cfg)} images": len(data.test),
            "params": sum(p.numel() for p in self.model.parameters()), "augment": cfg.augment.backend,
            "compile": self.options.compile, "cuda graph": self.options.cuda_graph,
        }
        if mixing_enabled(cfg.augment):
            info["train accuracy"] = "against each mixed image's dominant label (mixup/CutMix on)"
        self.logger.start(cfg.to_dict(), info, history=state.history)
        if state.global_step == 0 and ctx.is_main and self.options.tensorboard:   # a TensorBoard picture
            self.logger.images("train/augmented", augmented_preview(data, cfg), 0)
        if self.resume_path is None and resume.requested(cfg, ctx) == "auto":
            self.logger.message(f"train.resume=auto: no checkpoint in {ckpt.checkpoint_dir(self.out_dir)} yet; "
                                "starting fresh")
        if self.resume_path is not None:
            self.logger.message(f"resumed from {self.resume_path} at epoch {state.epoch + 1}, "
                                f"step {state.step_in_epoch} of it")

    def save(self, is_best: bool = False) -> None:
        """Collective: every rank contributes its RNG state (and, inside an epoch, its share
        of the epoch's sums), rank 0 writes."""
        with self.clock.phase("checkpoints"):
            self._save(is_best)

    def _save(self, is_best: bool) -> None:
        ctx = self.ctx
        rank_states = ctx.gather_objects(resume.rank_rng_state(ctx.device))
        if 0 < self.state.step_in_epoch < self.batches.steps_per_epoch:
            assert self.meter is not None
            self.state.epoch_partial = self.meter.partial()
        if ctx.is_main:
            payload = resume.payload(self.cfg, ctx, self.model, self.optimization, self.state, rank_states,
                                     self.static)
            self._saved(lambda: self.saver.submit(ckpt.checkpoint_dir(self.out_dir), payload, self.state.global_step,
                                                  self.options.keep_checkpoints, is_best, self.save_number))
        self.save_number += 1
        ctx.barrier()

    def _saved(self, write) -> None:
        """`write()` (a submit or a wait of the saver), with a failed save as one line."""
        try:
            write()
        except ckpt.SaveFailed as failed:
            if not isinstance(failed.error, OSError):
                raise failed.error from None
            # The write goes to a temporary file first: the previous checkpoint is intact.
            raise UserError(f"cannot write a checkpoint in '{ckpt.checkpoint_dir(self.out_dir)}' "
                            f"({failed.error.strerror}); free space there (each checkpoint file takes "
                            f"{failed.size / 2**20:.1f} MB) and continue with --resume; the previous checkpoint "
                            f"is intact: {self.saver.last_written or 'none'}") from None

    def _finish_writes(self) -> None:
        """Wait until every checkpoint submitted is on disk (rank 0), before the run ends."""
        if self.ctx.is_main:
            with self.clock.phase("checkpoints"):
                self._saved(self.saver.wait)

    def _on_sync(self, st: TrainState, read: Dict[str, float]) -> bool:
        """At the sync steps (engine.SyncPlan) and at the epoch's end: log, checkpoint, and
        decide whether to stop."""
        options = self.options
        if _test_fault_set():
            # The recovery tests kill a rank here and expect the checkpoints saved so far.
            self._finish_writes()
            self.ctx.barrier()
        _inject_test_fault(st.global_step, self.ctx)
        if st.global_step % options.log_every_steps == 0:
            with self.clock.phase("logging"):
                self.logger.step(st.global_step, {"train/step_loss": read["loss"],
                                                  "lr": self.schedule(st.global_step - 1)})
        if options.checkpoint_every_steps and st.global_step % options.checkpoint_every_steps == 0 \
                and st.step_in_epoch < self.batches.steps_per_epoch:
            self.save()
        return self._should_stop()

    def _should_stop(self) -> bool:
        options = self.options
        if options.stop_after_steps and self.state.global_step >= options.stop_after_steps:
            return True  # the same on every rank: no need to ask the others
        # Signals reach the ranks at different steps: they agree at this sync step, and
        # every rank learns which rank got which signal (for the message).
        received = torch.zeros(self.ctx.world_size, dtype=torch.int64, device=self.ctx.device)
        received[self.ctx.rank] = self.stop.received or 0
        agreed = self.ctx.max(received).tolist()
        self.signals_received = {rank: signum for rank, signum in enumerate(agreed) if signum}
        return bool(self.signals_received)

    def _interrupt(self) -> None:
        self._finish_writes()
        reason = _stop_reason(self.signals_received, self.ctx.world_size, self.options.stop_after_steps)
        self.logger.message(f"{reason} at step {self.state.global_step}; checkpoint in "
                            f"{ckpt.checkpoint_dir(self.out_dir)}; continue with train.resume=auto")
        raise Preempted()

    def _train_epoch(self):
        options, state, batches = self.options, self.state, self.batches
        epoch = state.epoch
        augment = epoch < options.epochs - self.cfg.augment.plain_last_epochs
        start_step = state.step_in_epoch
        batches.set_epoch(epoch, augment=augment)
        # Inside an epoch the dropout stream was restored from the checkpoint.
        if start_step == 0:
            torch.manual_seed(epoch_seed(self.cfg.seed, self.ctx.rank, epoch) + 1)
        progress = self.logger.progress(batches.iterate(start_step), total=batches.steps_per_epoch,
                                        desc=f"epoch {epoch + 1}/{options.epochs}", initial=start_step,
                                        images_per_step=self.optimization.global_batch,
                                        run_step=state.global_step, run_steps=self.schedule.total_steps)
        self.meter = EpochMeter(self.step, self.ctx, carried=state.epoch_partial if start_step else ())
        try:
            with self.clock.phase("training steps"):
                metrics = train_one_epoch(self.step, progress, self.schedule, state, self.plan, self.meter,
                                          on_sync=self._on_sync)
            self.clock.move("training steps", "set-up", metrics.setup_seconds)
        except NonFiniteLoss as exc:
            # Every rank raises it at the same step (the verdict comes from all-reduced
            # gradients), so all can learn from rank 0 which checkpoint is the last good one.
            self._finish_writes()
            good = self.ctx.gather_objects(str(self.saver.last_written or self.resume_path or ""))[0]
            where = (f"last good checkpoint: {good} (continue from it with train.resume=auto)" if good else
                     "no checkpoint was written before it (start again with the change)")
            raise NonFiniteLoss(f"{exc}; {where}") from None
        state.epoch_partial = []
        if metrics.setup_seconds:
            self.setup_seconds += metrics.setup_seconds
            self.logger.message(f"set-up (first step, compiling, capturing) took {metrics.setup_seconds:.1f}s "
                                "(not counted in the epoch's time)")
        return metrics

    def _evaluates_now(self) -> bool:
        epoch, t = self.state.epoch, self.options
        return epoch == t.epochs or epoch % t.eval_every_epochs == 0

    def _evaluate(self, metrics) -> Dict[str, Any]:
        t, ctx, state = self.options, self.ctx, self.state
        # BN running statistics averaged over ranks at every epoch's end, scored or not:
        # every rank then holds the same model, and so does each checkpoint.
        ctx.average_buffers(self.model)
        for average in (self.ema, self.optimization.lookahead):   # their BN statistics too
            if average is not None:
                ctx.average_buffers(average)
        row = {
            "global_step": state.global_step,
            "lr": self.schedule(state.global_step - 1),
            "train/loss": metrics.loss, "train/accuracy": metrics.accuracy,
            "epoch_seconds": metrics.seconds,
            "throughput/images_per_s": metrics.images_per_second,
        }
        if self._evaluates_now():
            row.update(self._score())
        if state.scaler_skipped_steps or state.skipped_steps:
            # Logged, not raised: fp16 loss-scale backoffs are routine.
            row["skipped_steps"] = state.skipped_steps
            row["scaler_skipped_steps"] = state.scaler_skipped_steps
            self.logger.message(f"skipped steps so far: {state.skipped_steps} non-finite, "
                                f"{state.scaler_skipped_steps} by the fp16 GradScaler")
        return row

    def _score(self) -> Dict[str, float]:
        """The evaluation split's loss and accuracy (and flip-TTA's, from the same passes)."""
        t, ctx, state = self.options, self.ctx, self.state
        eval_model = self.ema.module if self.ema is not None else self.model
        # The last epoch, and every figures_every_epochs, also draws pictures (TensorBoard's:
        # none to draw without it or with train.figures off). Decided on every rank alike.
        draw = t.tensorboard and t.figures and (
            state.epoch == t.epochs or (t.figures_every_epochs and state.epoch % t.figures_every_epochs == 0))
        with self.clock.phase("evaluation"):
            # At the training batch (an image and its mirror in one batch with TTA): a new
            # batch size would make cuDNN autotune every convolution again.
            self.last_eval = evaluate(eval_model, self.test_shard, self.data.stats, ctx, self.precision,
                                      self.cfg.model.num_classes, batch_size=max(t.batch_size // (1 + t.tta_flip), 1),
                                      channels_last=t.channels_last, keep_mistakes=FIGURE_MISTAKES if draw else 0,
                                      with_tta_accuracy=t.tta_flip)
        if draw and ctx.is_main:
            with self.clock.phase("logging"):
                test = self.data.test
                self.logger.figures(state.global_step, self.data.classes, self.last_eval.confusion,
                                    self.last_eval.mistakes, test.images, test.labels,
                                    probabilities(eval_model, test.images, self.data.stats, ctx.device))
        scores = {"test/loss": self.last_eval.loss, "test/accuracy": self.last_eval.accuracy}
        if self.last_eval.accuracy_tta is not None:
            scores["test/accuracy_tta"] = self.last_eval.accuracy_tta
        return scores

    def fit(self) -> Dict[str, Any]:
        """Train to the last epoch; returns the final metrics (on every rank)."""
        t, state = self.options, self.state
        with self.clock.phase("logging"):
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
                is_best = "test/accuracy" in row and row["test/accuracy"] > state.best_accuracy
                state.best_accuracy = max(state.best_accuracy, row.get("test/accuracy", -1.0))
                state.history.append({k: v for k, v in row.items()} | {"epoch": state.epoch})
                with self.clock.phase("logging"):
                    self.logger.epoch(state.epoch, t.epochs, row)
                self.save(is_best=is_best)
                if state.epoch < t.epochs and (metrics.stop_requested or self._should_stop()):
                    self._interrupt()
        self._finish_writes()
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
        with self.clock.phase("logging"):
            self.logger.finish(run_hparams(self.cfg, self.ctx.world_size), final, self.state.history)
        # DDP keeps replicas identical by construction; the digests let anyone check it.
        # Every rank's model and its averages (EMA, lookahead): equal on all ranks, or a bug.
        digests = self.ctx.gather_objects(weights_digest(self.model, self.ema, self.optimization.lookahead))
        # Where the wall time went, from the process's start (the launcher's clock) to here.
        wall = self.clock.breakdown()
        self.logger.wall_time(wall)
        # The keys say test_ for both splits (a stable interface); `evaluated_on` says which.
        return {**final, "evaluated_on": eval_split(self.cfg), "epochs": self.state.epoch,
                "setup_seconds": round(self.setup_seconds, 2), "wall_time_s": wall,
                "global_step": self.state.global_step, "world_size": self.ctx.world_size, "replica_digests": digests,
                "per_class_accuracy": self.last_eval.per_class_accuracy if self.last_eval else None}


def _warn_of_slow_depthwise(model: nn.Module, ctx: DistContext, precision: str) -> None:
    if ctx.device.type != "cpu" or not ctx.is_main:
        return
    bf16 = ", and its bf16 kernel gives non-finite values at random with several threads" if precision == "bf16" else ""
    plain, native = plain_dilated_depthwise(model), native_dilated_depthwise(model, ctx.device)
    for names, what, fix in ((plain, "a dilated depthwise nn.Conv2d", "build it with "
                              "cifar_ddp.models.blocks.DepthwiseConv2d (same weights)"),
                             (native, "a dilated DepthwiseConv2d run natively (model.dilated_depthwise=native)",
                              "leave model.dilated_depthwise at auto, or set it to spread (same weights)")):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            warnings.warn(f"{names[0]}{more} is {what}: on a CPU torch runs it 4-20x slower than an undilated "
                          f"one{bf16}; {fix}", stacklevel=3)


def run(cfg: Config, ctx: DistContext, logger: Optional[RunLogger] = None,
        clock: Optional[PhaseClock] = None) -> Dict[str, Any]:
    """Train as `cfg` says; returns the final metrics (on every rank). Rank 0, which writes
    everything, holds out_dir for the whole run (lock.hold): no other run can write there."""
    held = None
    if ctx.is_main:  # find out now, not after loading the data
        check_writable_folder(Path(cfg.out_dir), "out_dir")
        held = out_dir_lock.hold(Path(cfg.out_dir))
    trainer = None
    try:
        trainer = Trainer(cfg, ctx, logger, clock)
        return trainer.fit()
    finally:
        if trainer is not None and ctx.is_main:
            # Whatever ended the run, the checkpoint being written is finished before the
            # folder is let go (a failed write was reported already, or is moot now).
            with contextlib.suppress(Exception):
                trainer.saver.wait()
        if held is not None:
            held.release()


def weights_digest(*modules: Optional[nn.Module]) -> str:
    """SHA-256 over every parameter and buffer of each module given (None: skipped), in
    state_dict order."""
    digest = hashlib.sha256()
    for module in modules:
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _test_fault_set() -> bool:
    return any(os.environ.get(v) for v in ("CIFAR_DDP_TEST_SIGKILL", "CIFAR_DDP_TEST_SIGNAL"))


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




def checkpoint_size(model: nn.Module, averages: Sequence[Optional[nn.Module]], t) -> int:
    """About the bytes of one checkpoint file: the weights, the averages' copies (the EMA's,
    the lookahead's), the optimizer's per-weight state (SGD's momentum, AdamW's two
    moments); the rest is small."""
    def size(tensors) -> int:
        return sum(x.numel() * x.element_size() for x in tensors)
    per_weight = 2 if t.optimizer == "adamw" else 1 if t.momentum > 0 else 0
    return (size(model.state_dict().values()) + sum(size(a.state_dict().values()) for a in averages if a is not None)
            + per_weight * size(model.parameters()) + 64 * 1024)


def _check_room_for_checkpoints(out_dir: Path, model: nn.Module, averages: Sequence[Optional[nn.Module]],
                                t) -> None:
    """A disk too full for the first checkpoints stops the run before it trains, not after."""
    import shutil

    size = checkpoint_size(model, averages, t)
    need = 3 * size                                     # a step file, last.pt and best.pt
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise UserError(f"out_dir '{out_dir}' has {free / 2**20:.1f} MB free; this run's first checkpoints need "
                        f"about {need / 2**20:.1f} MB ({size / 2**20:.1f} MB each: a step file, last.pt and best.pt); "
                        "free space there or pick another out_dir=...")


__all__ = ["run", "Trainer", "Preempted", "StopSignal"]
