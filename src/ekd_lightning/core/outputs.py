"""Where the commands write: checked before the work, created with the user's umask, and an
operating-system failure while writing turned into a one-line error.

- :func:`check_writable`: a folder can be created and written, with enough free space, before
  any computing starts (a read-only or full disk is found in seconds, not after an hour).
- files get the mode ``open()`` gives (the user's umask) from the one atomic writer,
  :mod:`ekd_lightning.core.files`.
- :func:`os_error_message`: ``<file>: <what> (<errno name>): <fix>`` for an OSError raised while
  writing (disk full, read-only file system, permission denied, ...).
- :func:`refuse_overwrite`: an existing output is replaced only when asked (``--force``).
- :func:`exclusive`: one process at a time makes a given output (a training run's folder, a
  label file); a second one waits, then finds the first one's result.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import EKDError

log = logging.getLogger(__name__)


class OutputError(EKDError, OSError):
    """An output cannot be written: folder not writable, disk (nearly) full, or file exists."""


FIXES = {
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space (disk quota exceeded) or write to another disk",
    errno.EROFS: "the file system is read-only: write to another folder",
    errno.EACCES: "you may not write there: write to another folder",
    errno.EPERM: "you may not write there: write to another folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: write to another folder",
    errno.EEXIST: "a file is in the way: move it or write to another folder",
}
"""The advice for each errno that a write can fail with."""


def os_error_message(exc: OSError, path: str | Path | None = None) -> str:
    """``<file>: <strerror> (<ERRNO>): <fix>`` on one line for an OSError of a write."""
    where = exc.filename or path or "output"
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    fix = FIXES.get(exc.errno, "check the path and the disk, then run the command again")
    return f"{where}: {exc.strerror or exc} ({name}): {fix}"


def is_write_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError of the kinds in :data:`FIXES` (disk full, read-only, ...),
    which a command reports as a one-line error."""
    return isinstance(exc, OSError) and exc.errno in FIXES


def user_error_line(exc: BaseException) -> str | None:
    """The one-line message of an error the user can fix: an EKDError (bad input, config or
    checkpoint) or an OSError of a write (:func:`is_write_error`); None for anything else, which
    is a bug and should raise with its traceback."""
    if isinstance(exc, EKDError):
        return str(exc)
    if is_write_error(exc):
        return os_error_message(exc)
    return None


def check_writable(folder: str | Path, need_bytes: int = 0, what: str = "outputs") -> Path:
    """Create ``folder`` if needed and write (then remove) a small file in it; OutputError
    (one line: the folder, why, the fix) if that fails or its disk has less than
    ``need_bytes`` free. Works for root too (which ignores permission bits but not a read-only
    or full file system). Returns the folder."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ekd-write-check."):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise OutputError(f"cannot write the {what} into {folder}: {os_error_message(exc, folder)}") from exc
    if free < need_bytes:
        raise OutputError(
            f"{folder}: {free / 2**20:.1f} MiB free, the {what} need about "
            f"{need_bytes / 2**20:.1f} MiB: {FIXES[errno.ENOSPC]}")
    return folder


def refuse_overwrite(path: str | Path, force: bool, flag: str = "--force") -> None:
    """OutputError if ``path`` exists and ``force`` is not set."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path} already exists: pass {flag} to replace it, or choose another --out")


RANK_ENV = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
"""Environment variables through which a launcher (Lightning's DDP, torchrun, SLURM's srun, a
simulated node) tells a process its rank."""


def launched_rank_zero() -> bool:
    """False in a process that its launcher started as a non-zero rank (any of RANK_ENV set and
    not 0): such a process joins the work of rank 0 and must not take its lock."""
    return all(os.environ.get(key, "0") in ("", "0") for key in RANK_ENV)


@contextmanager
def exclusive(lock_path: str | Path, what: str) -> Iterator[None]:
    """Hold ``lock_path`` (filelock: fcntl on POSIX, released if the process dies) while
    ``what`` is made; a second process asking for it logs that it waits, and waits. Only rank 0
    of a distributed job locks (:func:`launched_rank_zero`); the ranks it launched work inside
    its lock."""
    if not launched_rank_zero():
        yield
        return
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: another process is making it; waiting for it", what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
