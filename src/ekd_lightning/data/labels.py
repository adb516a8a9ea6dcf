"""Distilled label files (HDF5): the teacher ensemble's forces for every conformation.

Layout (format ``ekd-labels``, version 1). The file mirrors the dataset: one group per dataset
molecule group, same path (``C2H6O``, ``s66x8/mol00``), with arrays over the group's
conformations *as stored in the dataset file* (index = conformation index in the file):

- ``forces`` (n_conf, n_atoms, 3) float32, Hartree/Å: ensemble mean of F = -dE/dx (the label)
- ``forces_std`` (n_conf, n_atoms, 3) float32, Hartree/Å: standard deviation over teachers
- ``energy`` (n_conf,) float64, Hartree: ensemble mean energy; ``energy_std`` (n_conf,)
- ``teacher_forces`` (n_teachers, n_conf, n_atoms, 3) float32 and ``teacher_energy``
  (n_teachers, n_conf) float64: each teacher's prediction
- ``labelled`` (n_conf,) bool: False where the conformation was not labelled (NaN energy)

Root attributes: ``format``, ``version``, ``dataset_path``, ``dataset_sha256``, ``energy_key``,
``teachers`` (JSON list of {path, sha256, model}), units, ``created``, ``code_version``.

Standard deviations are over the teachers with ddof=0 (zero for a single teacher); arrays of a
conformation that was not labelled hold NaN. :func:`write_labels` writes such a file atomically,
:func:`read_labels` reads it back for a dataset (checking the dataset's SHA-256 when given the
dataset path), :func:`verify_dataset` and :func:`~ekd_lightning.inference.teachers.verify_teachers`
refuse a label file made for another dataset or another teacher ensemble.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np

from ..core.errors import DataError, LabelMismatchError
from .readers import MoleculeRecord, open_h5

log = logging.getLogger(__name__)

LABEL_FORMAT = "ekd-labels"
LABEL_VERSION = 1
UNITS = {"units_energy": "Hartree", "units_forces": "Hartree/Angstrom", "units_length": "Angstrom"}
"""Unit attributes every label file carries."""
JSON_ATTRS = ("teachers", "elements")
"""Root attributes stored as JSON text."""
LABEL_ARRAYS = {
    # name: (dtype, per-teacher, per-atom)
    "forces": (np.float32, False, True),
    "forces_std": (np.float32, False, True),
    "energy": (np.float64, False, False),
    "energy_std": (np.float64, False, False),
    "teacher_forces": (np.float32, True, True),
    "teacher_energy": (np.float64, True, False),
}
"""The float arrays of every molecule group (besides the boolean ``labelled``)."""


# ----------------------------------------------------------------------------- hashes
HASH_CACHE_ENV = "EKD_HASH_CACHE"
"""Folder of the persistent hash cache; default ``$XDG_CACHE_HOME/ekd-lightning/sha256`` (else
``~/.cache/...``)."""


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
    from ..task import checkpoint

    entry, key = _cache_entry(path), {"path": path, "size": size, "mtime_ns": mtime_ns}
    try:
        recorded = json.loads(entry.read_text())
        if {k: recorded.get(k) for k in key} == key and len(recorded.get("sha256", "")) == 64:
            return recorded["sha256"]
    except (OSError, ValueError, AttributeError):
        pass
    digest = checkpoint.file_sha256(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{entry.name}.", dir=entry.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump({**key, "sha256": digest}, handle)
        os.replace(tmp, entry)
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


# ----------------------------------------------------------------------------- metadata
def read_label_metadata(path: str | Path) -> dict:
    """Root attributes of a label file (JSON attributes decoded).

    Raises DataError when the file is missing, not HDF5, truncated, not an ekd label file, or of
    a newer format version.
    """
    path = Path(path)
    with open_h5(path) as f:
        try:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
        except (OSError, RuntimeError) as exc:
            raise DataError(f"{path}: cannot read the label file's attributes (corrupt?): {exc}") from exc
    if attrs.get("format") != LABEL_FORMAT:
        raise DataError(f"{path}: not an ekd label file (root attribute format != '{LABEL_FORMAT}')")
    if int(attrs.get("version", 0)) > LABEL_VERSION:
        raise DataError(
            f"{path}: label format version {attrs['version']} is newer than this code's "
            f"{LABEL_VERSION}: update ekd-lightning"
        )
    for key in JSON_ATTRS:
        if key in attrs:
            try:
                attrs[key] = json.loads(attrs[key])
            except (TypeError, json.JSONDecodeError) as exc:
                raise DataError(f"{path}: root attribute '{key}' is not valid JSON: {exc}") from exc
    return attrs


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_metadata(f: h5py.File, metadata: Mapping) -> None:
    """Root attributes: format and version, units, then ``metadata`` (lists/dicts as JSON)."""
    f.attrs["format"] = LABEL_FORMAT
    f.attrs["version"] = LABEL_VERSION
    for key, value in {**UNITS, **metadata}.items():
        if key in JSON_ATTRS or isinstance(value, list | tuple | dict):
            value = json.dumps(value, sort_keys=True)
        elif isinstance(value, str):
            value = str(value)  # plain str (e.g. not torch's TorchVersion)
        f.attrs[key] = "" if value is None else value


# ----------------------------------------------------------------------------- checks
def verify_dataset(path: str | Path, dataset_path: str | Path, metadata: Mapping | None = None) -> None:
    """Refuse (LabelMismatchError) a label file made for another dataset file.

    Compares the ``dataset_sha256`` the file records with the SHA-256 of ``dataset_path``. A
    file without that attribute (written by hand) is accepted with a warning.
    """
    metadata = read_label_metadata(path) if metadata is None else metadata
    recorded = metadata.get("dataset_sha256")
    if not recorded:
        log.warning("%s records no dataset_sha256: cannot check it was made for %s", path, dataset_path)
        return
    actual = cached_sha256(dataset_path)
    if actual != recorded:
        raise LabelMismatchError(
            f"{path}: labels were distilled for dataset {metadata.get('dataset_path')} "
            f"(sha256 {recorded[:12]}…), but {dataset_path} has sha256 {actual[:12]}…: the "
            "dataset changed or is another file; re-run distill.py on this dataset"
        )


# ----------------------------------------------------------------------------- writing
def _rows(index: np.ndarray):
    """A slice when ``index`` (increasing ints) is contiguous (fast HDF5 writes), else itself."""
    if len(index) and index[-1] - index[0] + 1 == len(index):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def create_label_groups(f: h5py.File, layout: Iterable[tuple[str, int, int]], n_teachers: int) -> None:
    """Empty molecule groups: NaN arrays and ``labelled`` False for every conformation.

    Args:
        f: an open, writable label file.
        layout: ``(group key, conformations in the dataset group, atoms)`` per molecule.
        n_teachers: ensemble size.
    """
    for key, n_conf, n_atoms in layout:
        group = f.create_group(key)
        for name, (dtype, per_teacher, per_atom) in LABEL_ARRAYS.items():
            shape = ((n_teachers,) if per_teacher else ()) + (n_conf,) + ((n_atoms, 3) if per_atom else ())
            group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=np.nan)
        group.create_dataset("labelled", shape=(n_conf,), dtype=bool, fillvalue=False)


def write_label_rows(f: h5py.File, key: str, conf_index: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
    """Write the labels of some conformations of group ``key``.

    Args:
        conf_index: (k,) increasing conformation indices in the dataset group.
        arrays: every name of :data:`LABEL_ARRAYS`, shaped as in the file with k conformations
            (per-teacher arrays have the teacher axis first).
    """
    group = f[key]
    rows = _rows(np.asarray(conf_index))
    for name, (_, per_teacher, _) in LABEL_ARRAYS.items():
        if per_teacher:
            group[name][:, rows] = arrays[name]
        else:
            group[name][rows] = arrays[name]
    group["labelled"][rows] = True


def write_labels(
    path: str | Path,
    layout: Sequence[tuple[str, int, int]],
    n_teachers: int,
    blocks: Iterable[tuple[str, np.ndarray, Mapping[str, np.ndarray]]],
    metadata: Mapping,
) -> Path:
    """Write a complete label file atomically (temporary file in the same folder, then rename).

    Args:
        path: the label file to create or replace.
        layout: ``(group key, conformations in the dataset group, atoms)`` per molecule.
        n_teachers: ensemble size.
        blocks: ``(group key, conformation indices, arrays)`` as :func:`write_label_rows` takes.
        metadata: root attributes (dataset_path, dataset_sha256, energy_key, teachers, created,
            code_version, ...); ``format``, ``version`` and units are added.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            write_metadata(f, metadata)
            create_label_groups(f, layout, n_teachers)
            for key, conf_index, arrays in blocks:
                write_label_rows(f, key, conf_index, arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- reading
def read_labels(
    path: str | Path, records: Sequence[MoleculeRecord], dataset_path: str | Path | None = None
) -> list[dict[str, np.ndarray]]:
    """Label arrays aligned with each record's kept conformations.

    Returns one dict per record: ``forces`` (n_conf, n_atoms, 3) Hartree/Å and ``force_var``
    (n_conf, n_atoms) (Hartree/Å)², the per-atom teacher variance averaged over x, y, z; NaN
    where a conformation was not labelled. Raises DataError when the file is not a label file,
    or lacks a group or has wrong shapes for the dataset, and LabelMismatchError when
    ``dataset_path`` is given and is not the dataset the labels were made for (SHA-256).
    """
    path = Path(path)
    metadata = read_label_metadata(path)
    if dataset_path is not None:
        verify_dataset(path, dataset_path, metadata)
    out = []
    with open_h5(path) as f:
        for record in records:
            if record.key not in f:
                raise DataError(
                    f"{path}: no labels for dataset group '{record.key}'"
                    + (f" of {dataset_path}" if dataset_path else "")
                    + ": the label file was made for another dataset"
                )
            group = f[record.key]
            try:
                forces = group["forces"][()][record.conf_index]
                std = group["forces_std"][()][record.conf_index]
            except (KeyError, IndexError, OSError, RuntimeError) as exc:
                raise DataError(f"{path}: group '{record.key}' is incomplete or corrupt: {exc}") from exc
            expected = (record.num_conformations, len(record.atomic_numbers), 3)
            if forces.shape != expected or std.shape != expected:
                raise DataError(
                    f"{path}: group '{record.key}' forces have shape {forces.shape}, the dataset "
                    f"needs {expected}: the label file was made for another dataset"
                )
            out.append({"forces": forces, "force_var": (std.astype(np.float64) ** 2).mean(-1)})
    return out
