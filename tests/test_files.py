"""The one atomic-write helper (issue 25): a reader never sees half a file, an error leaves no
temporary file, the data reach the disk before the rename, the file mode honours the umask, and
no other module writes by rename."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

import ekd_lightning
from ekd_lightning.core import files
from ekd_lightning.core.files import atomic_path, write_atomic, write_json_atomic

SRC = Path(ekd_lightning.__file__).parent


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_file_mode_is_what_open_would_give(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_json_atomic({"a": 1}, tmp_path / "out.json")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(previous)
    mode = (tmp_path / "out.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "plain").stat().st_mode & 0o777


def test_an_error_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")

    def fail(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_the_temporary_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(
        f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(files.os, "replace", lambda a, b: (events.append(("replace", str(a))),
                                                           real_replace(a, b)))
    with atomic_path(tmp_path / "f.h5") as tmp:
        tmp.write_bytes(b"data")
    assert events[:2] == [("fsync", str(tmp)), ("replace", str(tmp))]
    assert (tmp_path / "f.h5").read_bytes() == b"data"


def test_no_module_writes_by_rename_but_core_files():
    """Every writer goes through core.files: no other module calls os.replace, os.rename or
    tempfile.mkstemp (a second write-then-rename would be a second behaviour)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path == SRC / "core" / "files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            renames = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                (node.value.id == "os" and node.attr in ("replace", "rename"))
                or (node.value.id == "tempfile" and node.attr == "mkstemp"))
            if renames or (isinstance(node, ast.ImportFrom) and node.module == "tempfile"):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert offenders == []
