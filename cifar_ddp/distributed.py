"""Everything distributed lives here, so the rest reads as single-process code.

Works the same under `python` (one process, no process group), `torchrun`
(one or several nodes) and `accelerate launch` (which starts torchrun's
machinery underneath): all of them describe the job with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""
    # How many times torchrun has restarted the group after a failure (0: first attempt).
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """A process group exists (under a launcher, even with one process)."""
        return bool(self.backend)

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (returns a new tensor; exact for integer counts)."""
        out = tensor.clone()
        if self.is_distributed:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        if self.is_distributed:
            dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def average_buffers(self, model: torch.nn.Module) -> None:
        """Average floating-point buffers (BN running statistics) over ranks.

        DDP broadcasts rank 0's buffers at the start of each forward, but the last
        forward of an epoch updates each rank's statistics from its own batch: left
        alone, ranks would evaluate and save slightly different models.
        """
        if not self.is_distributed:
            return
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(self.world_size)

    def gather_objects(self, obj: Any) -> List[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def wrap_ddp(model: torch.nn.Module, ctx: DistContext, stream: Optional["torch.cuda.Stream"] = None) -> torch.nn.Module:
    """`model` under DistributedDataParallel when a process group exists, else as it is.
    A step that will be captured as a CUDA graph needs DDP built on the side stream it
    warms up on (`stream`, from step.capture_stream)."""
    if not ctx.is_distributed:
        return model
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _select_device(preference: str, local_rank: int) -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda was asked for but no CUDA GPU is visible; use device=auto or device=cpu")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                "start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Join the job described by the launcher's environment (or run alone)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = _select_device(device_preference, local_rank)
    # Under a launcher (torchrun, accelerate) the group is formed even for one process, as
    # torchvision's references do: a one-GPU machine then runs the same nccl/DDP path as many.
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if not launched:
        return DistContext(device=device)

    backend = "nccl" if device.type == "cuda" else "gloo"
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = _env_int("MASTER_PORT", 29500)
    timeout = timedelta(seconds=timeout_s)
    # Under torchrun the agent already hosts a TCPStore at MASTER_ADDR:MASTER_PORT and
    # keeps it across restarts; otherwise rank 0 hosts one.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0 and not agent_store),
                          timeout=timeout, wait_for_workers=False)
    # After torchrun restarts a failed group the agent's store still holds the dead
    # attempt's keys; a fresh namespace per attempt keeps gloo from connecting to them.
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    store = dist.PrefixStore(f"cifar_ddp/attempt{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend,
                       restart_count=attempt)


def shutdown(ctx: DistContext) -> None:
    # Without an explicit destroy, a gloo rank sometimes aborts at interpreter exit
    # ("terminate called without an active exception").
    if ctx.is_distributed and dist.is_initialized():
        # DDP's reducer holds the process group and sits in reference cycles (its hooks),
        # so only the garbage collector frees it - otherwise at interpreter exit, while
        # gloo's threads are being torn down. Free it now, while the group is whole.
        gc.collect()
        # Leave together: a rank tearing down while its peer still talks to it is what
        # leaves gloo threads running into interpreter exit.
        try:
            dist.barrier()
        except RuntimeError:
            pass  # a peer already died; nothing left to wait for
        dist.destroy_process_group()
