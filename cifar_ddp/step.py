"""One training step that never waits on the host: forward, loss, backward (with DDP's
all-reduce), the optimizer update, lookahead, EMA and the running metrics all stay on the device.

Why it is built this way:
- The learning rate is a 0-dim tensor on the device that every parameter group points
  to; the host writes the next value into it (`set_lr`, a fill, not a read). Fused
  optimizers read it inside their kernel, so a compiled or captured step picks up
  each new value without recompiling or recapturing. A group with an `lr_mult` (BN biases
  under train.bn_bias_lr_mult) gets its own device tensor, filled with lr x lr_mult.
- The targets are labels (B,) or, with mixup / CutMix, soft labels (B, classes): the same
  cross-entropy (with label smoothing) takes either, and train accuracy is then counted
  against each image's dominant label (data/mixing.py). The shape decides, not a read.
- Gradient clipping (train.clip_grad_norm) scales the gradients by a factor computed on
  the device from their all-reduced total norm, as clip_grad_norm_ does; with fp16 the
  GradScaler unscales them first.
- A non-finite step is detected from the *all-reduced* gradients, so every rank
  reaches the same verdict without another collective, and the update is masked on
  the device (the fused optimizer's `found_inf`), never applied. The host learns
  about it at the next sync step (`TrainStep.read`).
- With `cuda_graph`, after `GRAPH_WARMUP_STEPS` eager steps (real steps, on a side
  stream, as DDP needs before capture) the whole step is captured once and then
  replayed: one launch per step instead of a few hundred. The batch is copied into
  fixed input buffers; every tensor the step touches keeps its address, so metrics
  and counters are reset in place, never reallocated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data.mixing import dominant_labels
from .ema import Lookahead, WeightEma
from .optim import MuonWithSGD
from .errors import UserError

# DDP needs 11 eager iterations before its backward can be captured (PyTorch's CUDA
# graphs notes); the same warm-up also lets cuDNN pick its kernels.
GRAPH_WARMUP_STEPS = 11


def autocast(device: torch.device, precision: str, cache_enabled: bool = True):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    # A captured graph must not reuse autocast's cast cache across replays.
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


def cpu_supports_bf16() -> bool:
    checker = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((checker and checker()) or (amx and amx()))


def resolve_precision(requested: str, device: torch.device) -> str:
    """Map train.precision "auto" to what the hardware runs fast; refuse what it cannot run."""
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        # Without native bf16 instructions autocast to bf16 is slower than fp32 on CPU.
        return "bf16" if cpu_supports_bf16() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    return requested


def resolve_step_options(cfg: TrainConfig, device: torch.device, precision: str) -> TrainConfig:
    """`cfg` with `cuda_graph: auto` made true or false for this device and precision,
    after refusing what cannot run here (assembly.step_options calls it before anything is
    built; TrainStep settles an "auto" it is still given): the rest of the code sees only
    true or false."""
    if cfg.cuda_graph == "auto":
        cfg = dataclasses.replace(cfg, cuda_graph=device.type == "cuda" and precision != "fp16")
    if cfg.cuda_graph and device.type != "cuda":
        raise UserError("train.cuda_graph=true needs a CUDA GPU; on CPU leave it false (train.compile=true works there)")
    if cfg.cuda_graph and precision == "fp16":
        raise UserError("train.cuda_graph=true does not work with fp16's GradScaler; use train.precision=bf16 "
                        "or fp32, or train.cuda_graph=false")
    return cfg


def capture_stream(cfg: TrainConfig, device: torch.device):
    """The side stream DDP must be built on, and warm up on, when the step is captured
    (`cfg` as resolve_step_options returns it)."""
    if cfg.cuda_graph == "auto":   # truthy, but not a decision
        raise ValueError("train.cuda_graph=auto must go through resolve_step_options first")
    if cfg.cuda_graph and device.type == "cuda":
        return torch.cuda.Stream(device)
    return None


class TrainStep:
    """Call with a batch to train on it. Nothing in it waits on the host; the host reads the
    device back through `read()` (at a run's sync steps) and `metrics()` (epoch ends) only.
    lr_find, which must see every step's loss, reads `last_loss` itself."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, precision: str,
                 device: torch.device, first_step: int, ema: Optional[WeightEma] = None,
                 scaler: Optional[torch.amp.GradScaler] = None, bare_model: Optional[nn.Module] = None,
                 stream: Optional["torch.cuda.Stream"] = None, lookahead: Optional[Lookahead] = None) -> None:
        # Its own guard too (a step can be built directly): settles "auto", refuses what
        # cannot run here; assembly.step_options has done the same before the data loaded.
        cfg = resolve_step_options(cfg, device, precision)
        self.model = torch.compile(model, dynamic=False) if cfg.compile else model
        self.bare_model = bare_model if bare_model is not None else model
        self.optimizer, self.ema, self.scaler = optimizer, ema, scaler
        self.lookahead = lookahead
        self.precision, self.device = precision, device
        self.label_smoothing = cfg.label_smoothing
        self.clip_grad_norm = cfg.clip_grad_norm
        self.cuda_graph = cfg.cuda_graph
        self.stream = stream
        self.params = [p for p in self.bare_model.parameters() if p.requires_grad]

        zeros = dict(device=device, dtype=torch.int64)
        self.lr = torch.zeros((), device=device, dtype=torch.float32)
        self.found_inf = torch.zeros((), device=device, dtype=torch.float32)
        self.step_count = torch.full((), first_step, **zeros)       # device copy of global_step
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), **zeros)
        self.seen = torch.zeros((), **zeros)
        self.last_loss = torch.zeros((), device=device, dtype=torch.float32)
        self.nonfinite_steps = torch.zeros((), **zeros)
        self.first_nonfinite_step = torch.full((), -1, **zeros)
        self.scaler_skipped = torch.zeros((), **zeros)
        self.scaled_lrs = _point_at_device_lr(optimizer, self.lr, capturable=cfg.cuda_graph)

        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.static_images: Optional[torch.Tensor] = None
        self.static_labels: Optional[torch.Tensor] = None
        self.eager_steps = 0
        self.setup_seconds = 0.0   # first step, compiling, capturing: kept out of training time

    # ------------------------------------------------------------- host side

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(lr)
        for tensor, mult in self.scaled_lrs:
            tensor.fill_(lr * mult)

    def reset_metrics(self, start: Sequence[float] = ()) -> None:
        """Zero the epoch's sums, or set them to `start` (loss sum, correct, seen), in place:
        a captured step keeps adding into these very tensors."""
        for tensor, value in zip((self.loss_sum, self.correct, self.seen), [*start, 0, 0, 0][:3]):
            tensor.fill_(value)

    def metrics(self) -> torch.Tensor:
        """(loss sum, correct, seen) of the steps since `reset_metrics`, still on the device."""
        return torch.stack([self.loss_sum, self.correct.double(), self.seen.double()])

    def read(self) -> Dict[str, float]:
        """The one host read (a sync point): the last loss, and non-finite / scaler-skipped
        steps since the previous read (their counters restart at 0)."""
        packed = torch.stack([self.last_loss.double(), self.nonfinite_steps.double(),
                              self.first_nonfinite_step.double(), self.scaler_skipped.double()]).tolist()
        for counter in (self.nonfinite_steps, self.scaler_skipped):
            counter.zero_()
        self.first_nonfinite_step.fill_(-1)
        return {"loss": packed[0], "nonfinite_steps": int(packed[1]), "first_nonfinite_step": int(packed[2]),
                "scaler_skipped_steps": int(packed[3])}

    # ------------------------------------------------------------- the step

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.graph is not None:
            self.static_images.copy_(images)
            self.static_labels.copy_(labels)
            self.graph.replay()
            return
        capture_now = self.cuda_graph and self.eager_steps == GRAPH_WARMUP_STEPS
        # Set-up steps, timed apart from training: the first step of a process pays for
        # lazy initialisation (on a GPU: loading cuDNN and autotuning every convolution,
        # about 9 s of fast85_gpu's first epoch on an H200) and, with train.compile, for
        # compiling; the capture step records the graph.
        setup = capture_now or self.eager_steps == 0
        started = time.perf_counter()
        if capture_now:
            self._capture(images, labels)
            self.graph.replay()
        elif self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self._step(images, labels)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        else:
            self._step(images, labels)
        self.eager_steps += 1
        if setup:
            _synchronize(self.device)  # once or twice per run, not in the steady state
            self.setup_seconds += time.perf_counter() - started

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.static_images = images.clone()
        self.static_labels = labels.clone()
        self.optimizer.zero_grad(set_to_none=True)
        _synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader thread pinning memory meanwhile must not break the capture.
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            self._step(self.static_images, self.static_labels)
        self.graph = graph

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(self.device, self.precision, cache_enabled=not self.cuda_graph):
            logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        images_in_batch = labels.shape[0]
        # Captured steps keep their gradient tensors (and their addresses) from replay to replay.
        self.optimizer.zero_grad(set_to_none=not self.cuda_graph)
        if self.scaler is not None:
            # fp16: the GradScaler masks overflowing steps itself, on the device (fused optimizers).
            scaled = self.scaler.scale(loss)   # first, as it creates the scale on the first step
            before = self.scaler._get_scale_async().clone()
            scaled.backward()
            if self.clip_grad_norm:
                self.scaler.unscale_(self.optimizer)   # clip the true gradients, not the scaled ones
                self._clip(torch.nn.utils.get_total_norm(self._grads(), foreach=True))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler._get_scale_async() < before
            self.scaler_skipped.add_(skipped.long())
            bad = torch.zeros((), dtype=torch.bool, device=self.device)
        else:
            loss.backward()
            # After backward, DDP has averaged the gradients: every rank sees the same norm.
            norm = torch.nn.utils.get_total_norm(self._grads(), foreach=True)
            bad = ~torch.isfinite(norm)
            if self.clip_grad_norm:
                self._clip(norm)   # a non-finite norm spoils the gradients, but that update is masked
            self.found_inf.copy_(bad.float())
            self.optimizer.found_inf = self.found_inf
            self.optimizer.step()
        if self.lookahead is not None:
            # Before the EMA, which then averages the model as the lookahead leaves it.
            self.lookahead.update(self.bare_model, self.step_count + 1, skip=bad)
        if self.ema is not None:
            self.ema.update(self.bare_model, skip=bad)
        good = ~bad
        detached = loss.detach()
        self.last_loss.copy_(detached)
        self.loss_sum.add_(torch.where(good, detached.double() * images_in_batch, 0.0))
        hits = (logits.detach().argmax(1) == dominant_labels(labels)).sum()
        self.correct.add_(torch.where(good, hits, 0))
        self.seen.add_(good.long() * images_in_batch)
        self.step_count.add_(1)
        self.nonfinite_steps.add_(bad.long())
        first = (self.first_nonfinite_step < 0) & bad
        self.first_nonfinite_step.copy_(torch.where(first, self.step_count, self.first_nonfinite_step))

    def _grads(self):
        return [p.grad for p in self.params if p.grad is not None]

    def _clip(self, total_norm: torch.Tensor) -> None:
        # clip_grad_norm_'s own factor, max_norm / (norm + 1e-6) capped at 1, applied on the
        # device with the norm already computed (clip_grad_norm_ is this pair of calls).
        torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_grad_norm, total_norm, foreach=True)


def _point_at_device_lr(optimizer: torch.optim.Optimizer, lr: torch.Tensor, capturable: bool):
    """Every parameter group reads the one device LR tensor, with the fused kernels (a
    checkpoint written by an older version carries foreach=True in its groups, and loading
    it would bring that back). SGD's momentum buffers start at zero (for dampening 0 this
    is exactly PyTorch's first step, buffer = gradient), so that a masked first step leaves
    no uninitialized buffer and nothing is allocated inside a captured step. AdamW refuses
    to be captured unless its groups say `capturable` (SGD has no such flag). A group with
    an `lr_mult` other than 1 reads a tensor of its own: returns those (tensor, multiplier)
    pairs, for set_lr."""
    scaled = []
    for group in optimizer.param_groups:
        own, mult = lr, group.get("lr_mult", 1.0)
        if mult != 1.0:
            own = torch.zeros_like(lr)
            scaled.append((own, mult))
        group.update(lr=own, fused=True, foreach=False)
        if "capturable" in group:
            group["capturable"] = capturable
        sgd = optimizer.sgd if isinstance(optimizer, MuonWithSGD) else optimizer
        if isinstance(sgd, torch.optim.SGD) and group.get("momentum", 0) != 0:
            for param in group["params"]:
                state = sgd.state[param]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return scaled


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = ["TrainStep", "GRAPH_WARMUP_STEPS", "autocast", "capture_stream", "resolve_precision",
           "resolve_step_options"]
