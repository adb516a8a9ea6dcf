"""File hashes: SHA-256 of a file's bytes, and a cache that hashes each version of a file once.

Run folders, label files and MD caches record the SHA-256 of their input files, so that a file
changed under the same name is noticed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from .errors import DataError
from .files import write_json_atomic

log = logging.getLogger(__name__)

HASH_CACHE_ENV = "EKD_HASH_CACHE"
"""Folder of the persistent hash cache; default ``$XDG_CACHE_HOME/ekd-lightning/sha256`` (else
``~/.cache/...``)."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_cache_dir() -> Path:
    """Where :func:`cached_sha256` keeps one small JSON file per hashed file."""
    if os.environ.get(HASH_CACHE_ENV):
        return Path(os.environ[HASH_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ekd-lightning" / "sha256"


def _cache_entry(path: str) -> Path:
    return hash_cache_dir() / (hashlib.sha256(path.encode()).hexdigest()[:32] + ".json")


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    """The SHA-256 of ``path`` at this (size, mtime): from the persistent cache when its entry
    records the same path, size and mtime, else computed (streamed) and recorded."""
    entry, key = _cache_entry(path), {"path": path, "size": size, "mtime_ns": mtime_ns}
    try:
        recorded = json.loads(entry.read_text())
        if {k: recorded.get(k) for k in key} == key and len(recorded.get("sha256", "")) == 64:
            return recorded["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = file_sha256(path)
    try:
        write_json_atomic({**key, "sha256": digest}, entry, indent=None)
    except OSError as exc:  # a read-only home: hash again next run, but work
        log.warning("cannot record the SHA-256 of %s in %s: %s", path, entry.parent, exc)
    return digest


def cached_sha256(path: str | Path) -> str:
    """SHA-256 of a file, hashed once per file version: remembered (in this process and in
    :func:`hash_cache_dir`, across runs) while its resolved path, size and modification time
    (ns) stay the same. A file rewritten in place gets a new mtime and is hashed again."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
