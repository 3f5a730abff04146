"""Checkpoints that are never half-written, never silently wrong, and plain PyTorch files.

Layout under <out_dir>/checkpoints/:
    save-000007-step-00001234.pt   one per save: the 7th save of the folder, at global step
                       1234; the newest `keep_checkpoints` are kept. The save number only
                       grows (step numbers do not: a resume under a larger global batch
                       has fewer steps per epoch), so the names sort in the order written.
                       Files of earlier versions, step-00001234.pt, are read as saves
                       older than any numbered one.
    last.pt            the newest save again (what users and `evaluate.py` pick up)
    best.pt            the save with the best test accuracy so far
    <name>.sha256      beside each: its SHA-256, in `sha256sum` format (`sha256sum -c` checks it)
Each .pt file is what `torch.save` writes - a dict of tensors and plain values (numbers,
strings, lists, dicts) - so `torch.load(path, weights_only=True)` reads it anywhere, and
this project reads it the same way: a file that holds anything else (a pickle that could
run code) is refused. Each file is written to a temporary name in the same folder,
flushed to disk, then renamed over its final name, then its checksum likewise: a crash
mid-save leaves the previous file, and a file whose checksum does not match is treated as
damaged, so `--resume` falls back to the previous save. A reader that meets a save in
progress (the new file renamed in, its checksum not yet) reads again instead.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .errors import UserError, exit_on_user_error
from .files import atomic_write, pending_names, pending_write

# save-<save number>-step-<global step>.pt; earlier versions wrote step-<global step>.pt.
_STEP_FILE = re.compile(r"^(?:save-(\d+)-)?step-(\d+)\.pt$")
# Files written before checkpoints were plain torch.save files: a header, then the body.
_OLD_HEADER = b"CIFARDDP1\n"


class CheckpointError(UserError):
    """A checkpoint is missing, damaged or does not fit this run."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def encode(payload: Dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def write_file(path: Path, data: bytes) -> None:
    """The checkpoint, then its checksum, each replaced atomically. The two renames cannot
    be one, so between them the pair disagrees: the checksum is written to its temporary
    file before the checkpoint is renamed in, and a reader that finds the pair disagreeing
    while that file is there knows a writer is between its renames (see _read_verified)."""
    with pending_write(checksum_path(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode()):
        atomic_write(path, data)


def _verify(path: Path, data: bytes) -> bytes:
    """The torch.save body of `data`, checked against its checksum wherever there is one."""
    if data.startswith(_OLD_HEADER):
        digest, _, body = data[len(_OLD_HEADER):].partition(b"\n")
        if hashlib.sha256(body).hexdigest().encode() != digest:
            raise CheckpointError(f"'{path}' is truncated or corrupt (checksum mismatch)")
        warnings.warn(f"'{path}' is in cifar_ddp's earlier checkpoint format (readable here, not by torch.load); "
                      "`python -m cifar_ddp.checkpoint upgrade FILE` rewrites it as a plain torch.save file",
                      stacklevel=4)
        return body
    sidecar = checksum_path(path)
    if sidecar.is_file():
        expected = (sidecar.read_text().split() or [""])[0]
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"'{path}' is truncated or corrupt (its SHA-256 differs from {sidecar.name})")
    else:
        warnings.warn(f"'{path}' has no {sidecar.name} beside it: loaded without an integrity check", stacklevel=4)
    return data


# How long a reader waits for a writer to finish replacing a checkpoint and its checksum
# (milliseconds apart, unless the writer is descheduled) before calling the pair damaged.
_WRITER_GRACE_S = 5.0


def _read_verified(path: Path) -> bytes:
    """The checked body of `path`, read again while a writer is replacing it: evaluating
    last.pt of a running training must not find it "corrupt" because the training renamed
    the new file in and not yet its checksum (the checksum's write is pending), or renamed
    one or both in between this reader's two reads (either is no longer the one read). A pair
    that disagrees with no writer at work is reported at once."""
    sidecar = checksum_path(path)
    deadline = time.monotonic() + _WRITER_GRACE_S
    while True:
        before = _identity(path), _identity(sidecar)
        try:
            return _verify(path, path.read_bytes())
        except CheckpointError:
            writer_at_work = pending_names(sidecar) or (_identity(path), _identity(sidecar)) != before
            if not writer_at_work:
                raise
            if time.monotonic() > deadline:
                raise CheckpointError(f"'{path}' disagrees with {sidecar.name} while a save to it is pending "
                                      f"(for {_WRITER_GRACE_S:.0f} s): a save still under way, or one killed half-way; "
                                      "try again when the run's save is done, or pick another checkpoint") from None
            _wait_for_writer()


def _wait_for_writer() -> None:
    time.sleep(0.01)


def _identity(path: Path) -> Tuple[int, int, int]:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return (0, 0, 0)
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def load_file(path: str | Path, expect: Tuple[str, ...] = ("model", "config")) -> Dict[str, Any]:
    """A checkpoint's payload, loaded with weights_only=True: tensors and plain values only.
    `expect`: the entries it must have (a training checkpoint's, by default)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder; pass a .pt file in it, e.g. {path / 'last.pt'}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    body = _read_verified(path)
    if not body.startswith(b"PK\x03\x04"):   # every torch.save file is a zip archive
        raise CheckpointError(f"'{path}' is not a cifar_ddp checkpoint (not a file written by torch.save)")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any class or function it does not know: such a file could
        # run code when unpickled. The first line of torch's message names the culprit.
        culprit = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line), "")
        raise CheckpointError(f"'{path}' holds Python objects other than tensors and plain values, and was not "
                              f"loaded (unpickling it could run code{': ' + culprit if culprit else ''}); "
                              "only files of tensors and plain values (what launch/train.py writes) are read") from None
    except Exception as exc:  # noqa: BLE001 - torch reports a damaged archive in many ways
        raise CheckpointError(f"'{path}' is truncated or corrupt ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
    missing = [key for key in expect if not isinstance(payload, dict) or key not in payload]
    if missing or not isinstance(payload, dict):
        raise CheckpointError(f"'{path}' is a PyTorch file but not a cifar_ddp checkpoint (it has no "
                              f"{' or '.join(repr(k) for k in missing) or 'dict'} entry); evaluate and resume need "
                              "one written by launch/train.py")
    return payload


def _save_files(directory: Path) -> List[Tuple[int, int, Path]]:
    """(save number, global_step, path) of the step files, newest first; files named by an
    earlier version (no save number) count as number 0, ordered by their step."""
    found = []
    if directory.is_dir():
        for p in directory.iterdir():
            match = _STEP_FILE.match(p.name)
            if match:
                found.append((int(match.group(1) or 0), int(match.group(2)), p))
    return sorted(found, reverse=True)


def step_files(directory: Path) -> List[Tuple[int, Path]]:
    """(global_step, path) of the step files, newest (last written) first."""
    return [(step, path) for _, step, path in _save_files(directory)]


def next_save_number(directory: Path) -> int:
    """The number the folder's next save gets: one more than any save in it."""
    return max((number for number, _, _ in _save_files(directory)), default=0) + 1


def step_file_name(save_number: int, global_step: int) -> str:
    return f"save-{save_number:06d}-step-{global_step:08d}.pt"


def save(directory: Path, payload: Dict[str, Any], global_step: int, keep: int, is_best: bool,
         save_number: Optional[int] = None) -> Path:
    """Write the step file, last.pt (and best.pt), then prune old step files. The payload
    records its save number ("save_number"): it orders last.pt and best.pt among the rest."""
    if save_number is None:
        save_number = next_save_number(directory)
    payload = {**payload, "save_number": save_number}
    data = encode(payload)
    step_path = directory / step_file_name(save_number, global_step)
    # The step file first: a crash while last.pt is replaced leaves this intact copy.
    write_file(step_path, data)
    write_file(directory / "last.pt", data)
    if is_best:
        write_file(directory / "best.pt", data)
    for _, old in step_files(directory)[keep:]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
    clear_unfinished(directory)
    return step_path


def clear_unfinished(directory: Path) -> None:
    """Delete the temporary files of saves killed half-way: never read, and a reader that
    meets one beside a damaged file would wait for a writer that is gone. Only for the
    holder of the run's out_dir (the trainer: no other writer can be at work there)."""
    for stale in directory.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def to_host(value: Any) -> Any:
    """A copy of a payload whose tensors are on the CPU and share no memory with the live
    ones (a state_dict's tensors are the parameters themselves, which training changes)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: to_host(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(item) for item in value)
    return value


class SaveFailed(Exception):
    """A background save failed: `error` (an OSError, say) and the size of what it wrote."""

    def __init__(self, error: BaseException, size: int) -> None:
        super().__init__(str(error))
        self.error, self.size = error, size


class BackgroundSaver:
    """Writes checkpoints (`save`) on a worker thread, so that training goes on meanwhile.
    One save at a time: the next one waits for the previous one, and a failure is raised
    (as SaveFailed) by the next `submit` or `wait`. The files are as atomic and checksummed
    as ever: a process killed mid-write leaves the previous checkpoint. The thread is not a
    daemon, so an interpreter that exits normally still finishes the write; trainer.run
    waits for it whatever ended the run (before a launcher's os._exit)."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[SaveFailed] = None
        self.last_written: Optional[Path] = None

    def submit(self, directory: Path, payload: Dict[str, Any], global_step: int, keep: int, is_best: bool,
               save_number: int) -> None:
        self.wait()
        host = to_host(payload)     # now, before training changes the tensors again

        def write() -> None:
            try:
                self.last_written = save(directory, host, global_step, keep, is_best, save_number)
            except BaseException as exc:  # noqa: BLE001 - reported on the training thread
                self._failure = SaveFailed(exc, len(encode({**host, "save_number": save_number})))

        self._thread = threading.Thread(target=write, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        """Until the save in progress is on disk; raises SaveFailed if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure


def resume_candidates(directory: Path) -> List[Path]:
    """Every checkpoint a resume may choose from: the step files (newest first), then
    last.pt and best.pt (unchecked: nothing is loaded)."""
    candidates = [p for _, p in step_files(directory)]
    return candidates + [directory / name for name in ("last.pt", "best.pt") if (directory / name).is_file()]


def recency(payload: Dict[str, Any]) -> Tuple[int, int, int, int]:
    """How late a checkpoint was written: its save number (which only grows), then - for
    files of earlier versions, which have none - its training progress: the epoch and the
    images seen in it. Global steps are not comparable across global batch sizes."""
    state = payload.get("train_state", {})
    seen = int(state.get("step_in_epoch", 0)) * int(payload.get("global_batch", 0))
    return (int(payload.get("save_number", 0)), int(state.get("epoch", -1)), seen, int(state.get("global_step", -1)))


def _recorded_digest(path: Path) -> Optional[str]:
    sidecar = checksum_path(path)
    return (sidecar.read_text().split() or [None])[0] if sidecar.is_file() else None


def resume_order(directory: Path) -> Optional[List[Path]]:
    """The candidates newest first, decided from names and checksum files alone: step files
    by save number, last.pt and best.pt right after the step file they are a byte copy of
    (the same SHA-256). A best.pt that copies no step file left was pruned, so it is older
    than all of them. None when that cannot decide (a last.pt that copies no step file, or
    files without checksums: an earlier version's folder)."""
    steps = [p for _, p in step_files(directory)]
    copies = {name: directory / name for name in ("last.pt", "best.pt") if (directory / name).is_file()}
    if not steps:
        return list(copies.values())
    digests = {path: _recorded_digest(path) for path in [*steps, *copies.values()]}
    if None in digests.values():
        return None
    order: List[Path] = []
    for step in steps:
        order.append(step)
        order += [copy for copy in copies.values() if digests[copy] == digests[step]]
    if "last.pt" in copies and copies["last.pt"] not in order:
        return None
    if "best.pt" in copies and copies["best.pt"] not in order:
        order.append(copies["best.pt"])
    return order


def find_resumable(directory: Path) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The newest intact checkpoint of the folder and its payload. In `resume_order`, the
    first file that loads and matches its checksum wins: each file is read at most once,
    and a damaged step file never hides a good last.pt. In a folder that order cannot be
    read from (an earlier version's), every candidate is loaded and the latest by its
    contents (`recency`) wins. Damaged files are named in one warning; nothing is deleted."""
    order = resume_order(directory)
    best: Optional[Tuple[Tuple[int, ...], Path, Dict[str, Any]]] = None
    damaged = []
    for path in order if order is not None else resume_candidates(directory):
        try:
            payload = load_file(path)
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
            damaged.append(str(exc) if isinstance(exc, CheckpointError) else f"'{path}' ({exc})")
            continue
        if order is not None:
            best = ((), path, payload)
            break
        key = recency(payload)
        if best is None or key > best[0]:   # on a tie the step file, listed first, stays
            best = (key, path, payload)
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


def upgrade(path: Path) -> None:
    """Rewrite a checkpoint (of any format this version reads) as a plain torch.save file
    with its checksum beside it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the "old format" note is why we are here
        payload = load_file(path, expect=())
    write_file(path, encode(payload))


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cifar_ddp.checkpoint",
                                     description="Rewrite checkpoints of the earlier format (a CIFARDDP1 header) as plain torch.save "
                                                 "files with a .sha256 beside each.")
    parser.add_argument("command", choices=["upgrade"])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)

    def work() -> int:
        for path in args.files:
            upgrade(path)
            print(f"upgraded {path} (+ {checksum_path(path).name})")
        return 0

    return exit_on_user_error(work)


if __name__ == "__main__":
    raise SystemExit(main())
