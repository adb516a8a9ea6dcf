"""Atomic file writing: the one way ekd-lightning writes a file that others read.

A file is written to a temporary file in its own folder (``.<name>.<random>.tmp``), flushed and
fsynced, then renamed over its path: a reader sees the old file or the new one, never half of
one, and a crash or an error leaves no temporary file behind. The file gets the mode a plain
``open(path, "w")`` would give (0o666 less the user's umask).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A new, empty temporary file beside ``path`` for the caller to fill (by name: h5py,
    ``torch.save``, ...); on leaving the block it is fsynced and renamed over ``path``; on an
    error it is removed. Creates ``path``'s folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode: 0o666 & ~umask
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:  # disk full, ...: the previous file stays as it was
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write names its file
            exc.filename = str(path)
        raise
    fsync_folder(path.parent)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(binary_handle)`` on a temporary file beside ``path``, then rename it over
    (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)


def write_bytes_atomic(data: bytes, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically."""
    write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_atomic(path, lambda handle: handle.write(text.encode()))


def write_json_atomic(obj, path: str | Path, indent: int | None = 2) -> None:
    """``obj`` as JSON (values JSON cannot hold written with ``str``), atomically."""
    write_text_atomic(json.dumps(obj, indent=indent, default=str), path)


def write_csv_atomic(rows: Sequence[Mapping], path: str | Path, columns: Sequence[str] | None = None) -> None:
    """Rows as CSV (header from ``columns`` or the first row's keys), written atomically."""
    columns = list(columns or (rows[0].keys() if rows else []))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(text.getvalue(), path)


def json_safe(value):
    """``value`` with NaN/inf floats replaced by None (strict JSON) and numpy scalars as Python."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
