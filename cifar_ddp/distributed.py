"""Everything distributed lives here, so the rest reads as single-process code.

Works the same under `python` (one process, no process group), `torchrun`
(one or several nodes) and `accelerate launch` (which starts torchrun's
machinery underneath): all of them describe the job with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Under SLURM's `srun` without a launcher,
the job is read from SLURM's own variables instead (`launch_environment`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Mapping, Optional

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

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s values into `tensor` on every rank (in place)."""
        if self.is_distributed:
            dist.broadcast(tensor, src)
        return tensor

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


def _env_int(name: str, default: int, env: Mapping[str, str] = os.environ) -> int:
    value = env.get(name)
    return default if value in (None, "") else int(value)


@dataclass(frozen=True)
class LaunchEnv:
    """The job a launcher described in the environment: who this process is, where rank 0 is."""
    launcher: str             # "torchrun" (torchrun, accelerate launch) or "srun"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    restart_count: int = 0    # torchrun's restarts of a failed group
    agent_store: bool = False  # torchrun's agent already hosts the TCPStore


def launch_environment(env: Mapping[str, str] = os.environ) -> Optional[LaunchEnv]:
    """The one place the launcher's environment is read; None for a plain single process.

    torchrun's variables win: under `srun torchrun ...` the workers see SLURM's too. An
    `srun` job step of several tasks with no launcher is a job of its own: rank, size and
    local rank from SLURM, rank 0 on the first node of the step (SLURM's block and cyclic
    distributions both put task 0 there), and a port derived from the job id unless
    MASTER_PORT says otherwise. The batch script itself (SLURM_PROCID=0 and the job's
    SLURM_NTASKS, but no job step) and a one-task step stay plain single-process runs.
    """
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        return LaunchEnv("torchrun", rank=_env_int("RANK", 0, env), world_size=_env_int("WORLD_SIZE", 1, env),
                         local_rank=_env_int("LOCAL_RANK", 0, env), master_addr=env["MASTER_ADDR"],
                         master_port=_env_int("MASTER_PORT", 29500, env),
                         restart_count=_env_int("TORCHELASTIC_RESTART_COUNT", 0, env),
                         agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true")
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None
    world_size = _env_int("SLURM_STEP_NUM_TASKS", _env_int("SLURM_NTASKS", 1, env), env)
    if world_size < 2:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
    if not nodes:
        raise UserError("srun started several tasks but SLURM_STEP_NODELIST/SLURM_JOB_NODELIST is not set; "
                        "set MASTER_ADDR, or start the job with torchrun")
    master_addr = env.get("MASTER_ADDR") or expand_nodelist(nodes)[0]
    port = _env_int("MASTER_PORT", 0, env) or slurm_port(_env_int("SLURM_JOB_ID", 0, env))
    return LaunchEnv("srun", rank=_env_int("SLURM_PROCID", 0, env), world_size=world_size,
                     local_rank=_env_int("SLURM_LOCALID", 0, env), master_addr=master_addr, master_port=port)


def slurm_port(job_id: int) -> int:
    """A rendezvous port for SLURM job `job_id`, the same on every node (launch/slurm/ uses
    the same rule): 20000-29999, below Linux's ephemeral range (32768-60999), so that an
    outgoing connection rarely holds it. Two jobs 10000 ids apart on one node collide:
    set MASTER_PORT for them."""
    return 20000 + job_id % 10000


_HOST_RANGE = re.compile(r"\[([^\[\]]*)\]")


def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM's compressed host list as host names, in order, as `scontrol show hostnames`:
    `gpu[01-04,07]` -> gpu01 gpu02 gpu03 gpu04 gpu07; `a[1-2]-ib[3-4],b` -> a1-ib3 a1-ib4
    a2-ib3 a2-ib4 b. Numbers keep the zero padding of the range's first bound."""
    hosts: List[str] = []
    for entry in _split_outside_brackets(nodelist):
        hosts.extend(_expand_entry(entry, nodelist))
    if not hosts:
        raise UserError(f"empty SLURM node list {nodelist!r}")
    return hosts


def _split_outside_brackets(text: str) -> List[str]:
    entries, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise UserError(f"malformed SLURM node list {text!r} (nested or unbalanced brackets)")
        if char == "," and depth == 0:
            entries.append(text[start:i])
            start = i + 1
    if depth:
        raise UserError(f"malformed SLURM node list {text!r} (an unclosed '[')")
    entries.append(text[start:])
    return [entry.strip() for entry in entries if entry.strip()]


def _expand_entry(entry: str, nodelist: str) -> List[str]:
    match = _HOST_RANGE.search(entry)
    if match is None:
        if "]" in entry:
            raise UserError(f"malformed SLURM node list {nodelist!r} (a ']' without '[')")
        return [entry]
    prefix, rest = entry[:match.start()], entry[match.end():]
    if "]" in prefix:
        raise UserError(f"malformed SLURM node list {nodelist!r} (a ']' without '[')")
    tails = _expand_entry(rest, nodelist) if rest else [""]
    return [prefix + number + tail for number in _expand_range(match.group(1), nodelist) for tail in tails]


def _expand_range(ranges: str, nodelist: str) -> List[str]:
    numbers: List[str] = []
    for part in ranges.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise UserError(f"malformed SLURM node list {nodelist!r} (range '{part}')")
        if not dash:
            numbers.append(low)
            continue
        if int(high) < int(low):
            raise UserError(f"malformed SLURM node list {nodelist!r} (range '{part}' runs backwards)")
        numbers.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return numbers


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
    job = launch_environment()
    # Under a launcher (torchrun, accelerate) the group is formed even for one process, as
    # torchvision's references do: a one-GPU machine then runs the same nccl/DDP path as many.
    if job is None:
        return DistContext(device=_select_device(device_preference, 0))
    device = _select_device(device_preference, _gpu_index(job))

    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    # Under torchrun the agent already hosts a TCPStore at MASTER_ADDR:MASTER_PORT and
    # keeps it across restarts; otherwise rank 0 hosts one.
    store = dist.TCPStore(job.master_addr, job.master_port, job.world_size,
                          is_master=(job.rank == 0 and not job.agent_store), timeout=timeout, wait_for_workers=False)
    # After torchrun restarts a failed group the agent's store still holds the dead
    # attempt's keys; a fresh namespace per attempt keeps gloo from connecting to them.
    store = dist.PrefixStore(f"cifar_ddp/attempt{job.restart_count}", store)
    dist.init_process_group(backend, store=store, rank=job.rank, world_size=job.world_size, timeout=timeout)
    return DistContext(rank=job.rank, world_size=job.world_size, local_rank=job.local_rank, device=device,
                       backend=backend, restart_count=job.restart_count)


def _gpu_index(job: LaunchEnv) -> int:
    # srun --gpus-per-task=1 (or --gpu-bind) shows each task only its own GPU: it is GPU 0
    # whatever the task's local id. Otherwise one GPU per local rank, as under torchrun.
    if job.launcher == "srun" and torch.cuda.is_available() and torch.cuda.device_count() == 1:
        return 0
    return job.local_rank


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
