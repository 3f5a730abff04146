"""Checkpoints that are never half-written and never silently wrong.

Layout under <out_dir>/checkpoints/:
    step-00001234.pt   one per save, the newest `keep_checkpoints` are kept
    last.pt            the newest save again (what users and `evaluate.py` pick up)
    best.pt            the save with the best test accuracy so far
Each file is written to a temporary name in the same folder, flushed to disk,
then renamed over its final name: a crash mid-save leaves the previous file.
Each file carries a SHA-256 of its payload, checked on load, so truncation or
corruption is detected and `resume=auto` falls back to the previous save.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .errors import UserError
from .files import atomic_write

FORMAT_VERSION = 1
_STEP_FILE = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(UserError):
    """A checkpoint is missing, damaged or does not fit this run."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def encode(payload: Dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    digest = hashlib.sha256(body).hexdigest().encode()
    # Header: magic, version, checksum of the body; then the torch.save body.
    return b"CIFARDDP" + str(FORMAT_VERSION).encode() + b"\n" + digest + b"\n" + body


def decode(data: bytes, source: str) -> Dict[str, Any]:
    header = b"CIFARDDP" + str(FORMAT_VERSION).encode() + b"\n"
    if not data.startswith(header):
        raise CheckpointError(f"'{source}' is not a cifar_ddp checkpoint (or is from an incompatible version)")
    rest = data[len(header):]
    digest, _, body = rest.partition(b"\n")
    if hashlib.sha256(body).hexdigest().encode() != digest:
        raise CheckpointError(f"'{source}' is truncated or corrupt (checksum mismatch)")
    # weights_only=False: the payload holds plain Python containers and RNG states we wrote ourselves.
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=False)


def load_file(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder; pass a .pt file in it, e.g. {path / 'last.pt'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    return decode(path.read_bytes(), str(path))


def step_files(directory: Path) -> List[Tuple[int, Path]]:
    """(global_step, path) of the step-*.pt files, newest first."""
    found = []
    if directory.is_dir():
        for p in directory.iterdir():
            match = _STEP_FILE.match(p.name)
            if match:
                found.append((int(match.group(1)), p))
    return sorted(found, reverse=True)


def save(directory: Path, payload: Dict[str, Any], global_step: int, keep: int, is_best: bool) -> Path:
    """Write step-N.pt, last.pt (and best.pt), then prune old step files."""
    data = encode(payload)
    step_path = directory / f"step-{global_step:08d}.pt"
    atomic_write(step_path, data)
    atomic_write(directory / "last.pt", data)
    if is_best:
        atomic_write(directory / "best.pt", data)
    for _, old in step_files(directory)[keep:]:
        old.unlink(missing_ok=True)
    # Temporary files left by a save that was killed half-way are never read; clear them.
    for stale in directory.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    return step_path


def resume_candidates(directory: Path) -> List[Path]:
    """Every checkpoint a resume may choose from: the step files (newest first), then
    last.pt and best.pt (unchecked: nothing is loaded)."""
    candidates = [p for _, p in step_files(directory)]
    return candidates + [directory / name for name in ("last.pt", "best.pt") if (directory / name).is_file()]


def find_resumable(directory: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest intact checkpoint of the folder, by training step: every candidate is
    loaded and checksummed, so a damaged step file never hides a good last.pt. Damaged
    files are named in one warning; nothing is deleted here."""
    best: Optional[Tuple[int, Path, Dict[str, Any]]] = None
    damaged = []
    for path in resume_candidates(directory):
        try:
            payload = load_file(path)
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
            damaged.append(f"'{path}' ({exc})")
            continue
        step = int(payload.get("train_state", {}).get("global_step", -1))
        if best is None or step > best[0]:   # on a tie the step file, listed first, stays
            best = (step, path, payload)
    if damaged:
        chosen = f"resuming from '{best[1]}'" if best else "no intact checkpoint is left"
        warnings.warn(f"checkpoint(s) cannot be used: {'; '.join(damaged)}; {chosen}", stacklevel=2)
    return (best[1], best[2]) if best else None


def architecture_signature(state_dict: Dict[str, torch.Tensor]) -> List[Tuple[str, Tuple[int, ...]]]:
    return [(name, tuple(t.shape)) for name, t in state_dict.items()]


def check_architecture(payload: Dict[str, Any], model_state: Dict[str, torch.Tensor], source: str,
                       advice: str = "or start fresh with train.resume=''") -> None:
    saved = payload.get("architecture")
    here = architecture_signature(model_state)
    if saved is None or list(saved) == here:
        return
    saved_names = dict(saved)
    for name, shape in here:
        if name not in saved_names:
            detail = f"layer '{name}' is not in the checkpoint"
            break
        if saved_names[name] != shape:
            detail = f"'{name}' has shape {saved_names[name]} in the checkpoint but {shape} in this model"
            break
    else:
        detail = f"the checkpoint has {len(saved)} tensors, this model {len(here)}"
    raise CheckpointError(
        f"checkpoint '{source}' was saved from a different architecture: {detail}. "
        f"Use the model settings it was trained with (they are stored in the checkpoint's config) {advice}"
    )
