"""What a training checkpoint holds, which one a run continues from, and putting it back:
the weights, optimizer, scaler, EMA and lookahead, where the run stands, and each rank's random
streams. checkpoint.py owns the files (atomic, checksummed, weights-only); this module owns
what is in them and what a resume means.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from . import checkpoint as ckpt
from .assembly import Optimization
from .config import Config
from .data.loaders import TrainBatches
from .distributed import DistContext
from .engine import TrainState
from .errors import UserError

# A checkpoint to continue from: its path and its payload (read once).
Source = Tuple[Path, Dict[str, Any]]


def rank_rng_state(device: torch.device) -> Dict[str, Any]:
    # Augmentation draws follow from (seed, rank, epoch); dropout's come from these.
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rank_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def payload(cfg: Config, ctx: DistContext, model: nn.Module, optimization: Optimization, state: TrainState,
            rank_states: List[Dict[str, Any]], static: Dict[str, Any]) -> Dict[str, Any]:
    """Everything a checkpoint holds (rank 0's view; `rank_states`: every rank's RNG
    state, gathered). `static`: what travels with every checkpoint (stats, classes)."""
    return {
        "model": model.state_dict(),
        "architecture": ckpt.architecture_signature(model.state_dict()),
        "ema": optimization.ema.state_dict() if optimization.ema is not None else None,
        "lookahead": optimization.lookahead.state_dict() if optimization.lookahead is not None else None,
        "optimizer": optimization.optimizer.state_dict(),
        "scaler": optimization.scaler.state_dict() if optimization.scaler is not None else None,
        "train_state": asdict(state),
        "rank_rng": rank_states,
        "world_size": ctx.world_size,
        "global_batch": optimization.global_batch,
        "config": cfg.to_dict(),
        **static,
    }


def requested(cfg: Config, ctx: DistContext) -> str:
    """train.resume as this attempt means it."""
    if not cfg.train.resume and ctx.restart_count > 0:
        # torchrun restarted the group after a worker died: pick up where it left off.
        return "auto"
    return cfg.train.resume


def refuse_to_overwrite(cfg: Config, ctx: DistContext) -> None:
    """A fresh run in a folder holding another run's checkpoints would mix the two: its
    early step files would be pruned as older than the earlier run's, and a later
    resume=auto would pick the wrong run."""
    if requested(cfg, ctx):
        return
    directory = ckpt.checkpoint_dir(cfg.out_dir)
    found = bool(ckpt.resume_candidates(directory))
    # Decided together, so that no rank is left waiting in a collective for one that stopped.
    if ctx.max(torch.tensor(float(found), device=ctx.device)).item() > 0:
        raise UserError(
            f"out_dir '{cfg.out_dir}' already holds checkpoints of an earlier run; continue it with "
            f"--resume (train.resume=auto), or start afresh in another out_dir=..., or delete '{directory}'"
        )


def find_source(cfg: Config, ctx: DistContext) -> Optional[Source]:
    """The checkpoint to continue from, read and checksummed once, or None to start fresh."""
    resume = requested(cfg, ctx)
    if not resume:
        return None
    if resume in ("auto", "latest"):
        directory = ckpt.checkpoint_dir(cfg.out_dir)
        if ctx.is_main and directory.is_dir():   # rank 0 holds out_dir: no save of its own is under way
            ckpt.clear_unfinished(directory)
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


def restore(source: Source, ctx: DistContext, model: nn.Module, optimization: Optimization, state: TrainState,
            batches: TrainBatches) -> None:
    """Put the checkpoint back into this run's model, optimizer, scaler, EMA, lookahead and state."""
    path, saved = source
    ckpt.check_architecture(saved, model.state_dict(), str(path))
    model.load_state_dict(saved["model"])
    if optimization.ema is not None and saved.get("ema") is not None:
        optimization.ema.load_state_dict(saved["ema"])
    if optimization.lookahead is not None:
        if saved.get("lookahead") is not None:
            optimization.lookahead.load_state_dict(saved["lookahead"])
        else:
            # A checkpoint of a run without the lookahead: the average starts at the weights
            # resumed, not at this run's random initial ones (which its next beat would mix in).
            optimization.lookahead.module.load_state_dict(model.state_dict())
    optimization.optimizer.load_state_dict(saved["optimizer"])
    if optimization.scaler is not None and saved.get("scaler") is not None:
        optimization.scaler.load_state_dict(saved["scaler"])
    for key, value in saved["train_state"].items():
        setattr(state, key, value)
    old_world, old_batch = saved["world_size"], saved["global_batch"]
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
        restore_rank_rng_state(saved["rank_rng"][ctx.rank], ctx.device)
    # At an epoch boundary every random stream is re-derived from (seed, rank, epoch).


__all__ = ["Source", "find_source", "payload", "rank_rng_state", "refuse_to_overwrite", "requested", "restore"]
