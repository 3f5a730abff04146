"""One run per out_dir: a training run holds an exclusive lock on its folder for as long
as it lives, so a second run, or an evaluation report or LR plot written into it, stops
with a line naming the holder instead of mixing its files with the run's.

The lock is flock(2) on the folder itself, so the kernel drops it when the process ends,
however it ends: after a SIGKILL or a torchrun restart there is nothing to clean up. Who
holds it (host, pid) is written beside it in `.cifar_ddp.lock`, for the message only; the
file is removed when the run ends, and one left by a killed run is simply overwritten.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import List, Optional

from .errors import UserError
from .files import atomic_write

HOLDER_FILE = ".cifar_ddp.lock"


class OutDirLock:
    """Held from `hold()` until `release()` (or the process's end). A folder that holding
    it created is removed again on release if nothing else was written into it."""

    def __init__(self, folder: Path, fd: int, created: List[Path]) -> None:
        self.folder, self._fd, self._created = folder, fd, created

    def release(self) -> None:
        if self._fd < 0:
            return
        (self.folder / HOLDER_FILE).unlink(missing_ok=True)
        for folder in reversed(self._created):     # deepest first; stops at the first with files
            try:
                folder.rmdir()
            except OSError:
                break
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> "OutDirLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold(out_dir: Path) -> OutDirLock:
    """Create `out_dir` if needed and lock it, or stop naming the run that holds it (or
    a run holding a folder above it)."""
    folder = Path(out_dir).absolute()
    refuse_if_held(folder, "out_dir", shown=out_dir)
    created = []
    for missing in reversed([folder, *folder.parents]):
        if not missing.exists():
            try:
                missing.mkdir()
                created.append(missing)
            except FileExistsError:     # made meanwhile by someone else: not ours to remove
                pass
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    lock = OutDirLock(folder, fd, created)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock._created = []    # the holder's folder
        lock.release()
        raise _in_use("out_dir", out_dir, folder, folder) from None
    try:
        atomic_write(folder / HOLDER_FILE, f"{socket.gethostname()} {os.getpid()} {int(time.time())}\n".encode())
    except OSError as exc:
        lock.release()
        raise UserError(f"out_dir '{out_dir}' cannot be written ({exc.strerror}); free space there or pick "
                        "another out_dir=...") from None
    return lock


def refuse_if_held(path: Path, what: str, shown: Optional[str | Path] = None) -> None:
    """Stop if `path` is, or is inside, the out_dir of a training run that is running now."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if not (folder / HOLDER_FILE).is_file():
            continue
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            # Shared: two readers do not stop each other; the run's exclusive lock stops both.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(what, shown or path, path, folder) from None
        finally:
            os.close(fd)


def _in_use(what: str, shown: str | Path, path: Path, folder: Path) -> UserError:
    where = "is in use by" if folder == path else f"is inside '{folder}', the out_dir of"
    return UserError(f"{what} '{shown}' {where} a training run that is running now ({_holder(folder)}); "
                     f"wait for it to end, or pick another {what}{'' if what.startswith('-') else '=...'}")


def _holder(folder: Path) -> str:
    try:
        host, pid, since = (folder / HOLDER_FILE).read_text().split()[:3]
        return f"pid {pid} on host {host}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(int(since)))}"
    except (OSError, ValueError):
        return "a process that has not said which yet"


__all__ = ["HOLDER_FILE", "OutDirLock", "hold", "refuse_if_held"]
