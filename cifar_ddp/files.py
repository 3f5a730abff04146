"""Writing files that a crash cannot leave half-written, where they can be written."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import tempfile
from pathlib import Path
from typing import Iterator, List

from .errors import UserError


def check_writable_folder(path: Path, what: str) -> None:
    """Refuse, before any work, a folder that cannot be made or written - without creating
    it, so a run that fails later for another reason leaves nothing behind."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} '{path}' cannot be created: '{probe}' is a file, not a folder; "
                        f"pick another {what}=...")
    try:
        # The only sure test (permissions, read-only mounts, /proc, quotas, a full disk): try
        # to make a folder and write a byte to disk in it, then tidy up.
        folder = tempfile.mkdtemp(dir=probe, prefix=".cifar_ddp_probe.")
        try:
            with open(os.path.join(folder, "probe"), "wb") as f:
                f.write(b"\0")
                f.flush()
                os.fsync(f.fileno())
        finally:
            Path(folder, "probe").unlink(missing_ok=True)
            os.rmdir(folder)
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        raise UserError(f"{what} '{path}' cannot be written ({exc.strerror} in '{probe}'); "
                        + ("free space there or pick another" if full else "pick a writable") + f" {what}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files get the mode any other file of the process would (mkstemp alone makes them 0600).
_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def pending_write(path: Path, data: bytes) -> Iterator[None]:
    """Write `data` beside `path` under a temporary name (flushed to disk), run the body,
    then rename it over `path`: a reader sees the old file or the new one, never a torn
    one, even if the process dies mid-write. While the body runs the temporary file is
    there to be seen (pending_names), which is how a reader knows a write is on its way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, _FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if exc.filename is None:     # a failed write() names no file: name the one meant
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            raise
        yield                            # the body's own errors pass as they are
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def pending_names(path: Path) -> List[Path]:
    """The temporary files of writes to `path` still on their way (or left by a killed writer)."""
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader sees the old file or the new one, never
    a torn one, even if the process dies mid-write."""
    with pending_write(path, data):
        pass
