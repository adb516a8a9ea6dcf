"""Distilled label files (HDF5): the teacher ensemble's forces for the labelled conformations.

Layout (format ``ekd-labels``, version 2, compact; ``docs/label-files.md``). One group per
dataset molecule group, same path (``C2H6O``, ``s66x8/mol00``), holding one row per *labelled*
conformation, rows in increasing conformation order:

- ``conf_index`` (n_rows,) int64: the index in the dataset group of each row's conformation
- ``forces`` (n_rows, n_atoms, 3) float32, Hartree/Å: ensemble mean of F = -dE/dx (the label)
- ``forces_std`` (n_rows, n_atoms, 3) float32, Hartree/Å: standard deviation over teachers
- ``energy`` (n_rows,) float64, Hartree: ensemble mean energy; ``energy_std`` (n_rows,)
- ``teacher_energy`` (n_teachers, n_rows) float64: each teacher's energy; and only when asked
  for (``ekd-distill member_forces=true``; they multiply the file's size by about
  (2 + n_teachers) / 2), ``teacher_forces`` (n_teachers, n_rows, n_atoms, 3) float32
- group attribute ``n_conformations``: the conformations of the dataset group

Version 1 (dense, written before 2026-12-07) had the same arrays over *every* conformation of
the group (row = conformation index), NaN where not labelled, and ``labelled`` (n_conf,) bool
instead of ``conf_index``; :func:`read_labels` reads both to the same values.

Root attributes: ``format``, ``version``, ``dataset_path``, ``dataset_sha256``, ``energy_key``,
``teachers`` (JSON list of {path, sha256, model}), units, ``created``, ``code_version``.

Standard deviations are over the teachers with ddof=0 (zero for a single teacher).
:func:`write_labels` writes such a file atomically, :func:`read_labels` reads it back for a
dataset (checking the dataset's SHA-256 when given the dataset path), :func:`verify_dataset` and
:func:`~ekd_lightning.inference.teachers.verify_teachers` refuse a label file made for another
dataset or another teacher ensemble.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from ..core.errors import DataError, LabelMismatchError
from ..core.files import atomic_path
from ..core.hashing import cached_sha256  # noqa: F401  (where callers have found it)
from .readers import MoleculeRecord, open_h5

log = logging.getLogger(__name__)

LABEL_FORMAT = "ekd-labels"
LABEL_VERSION = 2
"""Layout version written: 2, compact (labelled rows only); version 1 (dense) is still read."""
COMPACT_VERSION = 2
"""The first version that stores only labelled rows (with ``conf_index``)."""
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
"""The float arrays of a molecule group (besides its ``conf_index``); those of
:data:`OPTIONAL_ARRAYS` only when the file was made with them."""
OPTIONAL_ARRAYS = ("teacher_forces",)
"""Arrays written only on request (``member_forces``): no reader of the package needs them."""


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


# ----------------------------------------------------------------------------- rows
def row_positions(stored: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where conformations sit among a group's rows.

    Args:
        stored: (n_rows,) strictly increasing conformation indices of the rows (``conf_index``).
        wanted: (k,) conformation indices to look up.

    Returns:
        ``positions`` (k,) int64, the row of each wanted conformation (valid where found), and
        ``found`` (k,) bool, False for a conformation that has no row (not labelled).
    """
    stored, wanted = np.asarray(stored, dtype=np.int64), np.asarray(wanted, dtype=np.int64)
    positions = np.searchsorted(stored, wanted)
    found = positions < len(stored)
    found[found] = stored[positions[found]] == wanted[found]
    return positions, found


def _rows(index: np.ndarray):
    """A slice when ``index`` (increasing ints) is contiguous (fast HDF5 writes), else itself."""
    if len(index) and index[-1] - index[0] + 1 == len(index):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


# ----------------------------------------------------------------------------- writing
def create_label_groups(
    f: h5py.File, layout: Iterable[tuple[str, int, np.ndarray, int]], n_teachers: int,
    member_forces: bool = False,
) -> None:
    """Empty molecule groups with one row per conformation to be labelled (NaN until written).

    Args:
        f: an open, writable label file.
        layout: ``(group key, conformations in the dataset group, (n_rows,) strictly increasing
            conformation indices to label, atoms)`` per molecule.
        n_teachers: ensemble size.
        member_forces: also each teacher's forces (``teacher_forces``).
    """
    names = {k: v for k, v in LABEL_ARRAYS.items() if member_forces or k not in OPTIONAL_ARRAYS}
    for key, n_conf, conf_index, n_atoms in layout:
        group = f.create_group(key)
        group.attrs["n_conformations"] = int(n_conf)
        group.create_dataset("conf_index", data=np.asarray(conf_index, dtype=np.int64))
        n_rows = len(conf_index)
        for name, (dtype, per_teacher, per_atom) in names.items():
            shape = ((n_teachers,) if per_teacher else ()) + (n_rows,) + ((n_atoms, 3) if per_atom else ())
            group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=np.nan)


def write_label_rows(f: h5py.File, key: str, rows: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
    """Write the labels of some rows of group ``key``.

    Args:
        rows: (k,) increasing row positions in the group (see :func:`row_positions`).
        arrays: every array of the group (:data:`LABEL_ARRAYS`, those of
            :data:`OPTIONAL_ARRAYS` when it has them), shaped as in the file with k rows
            (per-teacher arrays have the teacher axis first); others are ignored.
    """
    group = f[key]
    rows = _rows(np.asarray(rows))
    for name, (_, per_teacher, _) in LABEL_ARRAYS.items():
        if name not in group:
            continue
        if per_teacher:
            group[name][:, rows] = arrays[name]
        else:
            group[name][rows] = arrays[name]


def write_labels(
    path: str | Path,
    layout: Sequence[tuple[str, int, np.ndarray, int]],
    n_teachers: int,
    blocks: Iterable[tuple[str, np.ndarray, Mapping[str, np.ndarray]]],
    metadata: Mapping,
    member_forces: bool = False,
) -> Path:
    """Write a complete label file atomically (temporary file in the same folder, then rename).

    Args:
        path: the label file to create or replace.
        layout: as :func:`create_label_groups` takes it: the conformations that get rows.
        n_teachers: ensemble size.
        blocks: ``(group key, (k,) increasing conformation indices, arrays)``, arrays as
            :func:`write_label_rows` takes them; together they must fill every row of ``layout``.
        metadata: root attributes (dataset_path, dataset_sha256, energy_key, teachers, created,
            code_version, ...); ``format``, ``version`` and units are added.
        member_forces: also store each teacher's forces (``teacher_forces``, in the blocks).

    Raises:
        ValueError: a block names a conformation without a row, or a row was never written.
    """
    path = Path(path)
    stored = {key: np.asarray(conf_index, dtype=np.int64) for key, _, conf_index, _ in layout}
    written = {key: np.zeros(len(conf_index), bool) for key, conf_index in stored.items()}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        write_metadata(f, metadata)
        create_label_groups(f, layout, n_teachers, member_forces)
        for key, conf_index, arrays in blocks:
            rows, found = row_positions(stored[key], conf_index)
            if not found.all():
                raise ValueError(f"{path}: group '{key}' has no row for conformations "
                                 f"{np.asarray(conf_index)[~found][:5].tolist()}")
            write_label_rows(f, key, rows, arrays)
            written[key][rows] = True
        unwritten = [key for key, done in written.items() if not done.all()]
        if unwritten:
            raise ValueError(f"{path}: rows of groups {unwritten[:5]} were never written")
    return path


# ----------------------------------------------------------------------------- reading
def _dense_rows(group: h5py.Group, record: MoleculeRecord) -> tuple[np.ndarray, np.ndarray]:
    """Version 1: ``forces`` and ``forces_std`` of the record's conformations (rows = index)."""
    return group["forces"][()][record.conf_index], group["forces_std"][()][record.conf_index]


def _check_rows(stored: np.ndarray, n_conf: int, n_rows: Sequence[int], key: str, path: Path) -> None:
    """Refuse (DataError) a version-2 group whose ``conf_index`` is not strictly increasing
    within its ``n_conformations`` or whose arrays do not have one row per entry."""
    ordered = not len(stored) or (stored[0] >= 0 and stored[-1] < n_conf and np.all(np.diff(stored) > 0))
    if not ordered or any(n != len(stored) for n in n_rows):
        raise DataError(f"{path}: group '{key}' has a conf_index that is not strictly increasing "
                        f"within its {n_conf} conformations or not one per row: the file is "
                        "corrupt; delete it and re-run distill.py")


def _compact_rows(group: h5py.Group, record: MoleculeRecord, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Version 2: ``forces`` and ``forces_std`` of the record's conformations, NaN for those
    without a row, as version 1 gives them."""
    stored, forces, std = (group[name][()] for name in ("conf_index", "forces", "forces_std"))
    n_conf = int(group.attrs["n_conformations"])
    _check_rows(stored, n_conf, (len(forces), len(std)), record.key, path)
    wanted = np.asarray(record.conf_index, dtype=np.int64)
    if len(wanted) and wanted.max() >= n_conf:
        raise DataError(f"{path}: group '{record.key}' labels {n_conf} conformations, the dataset "
                        f"has conformation {int(wanted.max())}: the label file was made for "
                        "another dataset; re-run distill.py on this dataset")
    if np.array_equal(stored, wanted):  # the usual case: the rows are the record's conformations
        return forces, std
    rows, found = row_positions(stored, wanted)
    out = []
    for values in (forces, std):
        array = np.full((len(wanted), *values.shape[1:]), np.nan, values.dtype)
        array[found] = values[rows[found]]
        out.append(array)
    return out[0], out[1]


def _group_forces(f: h5py.File, record: MoleculeRecord, path: Path, compact: bool,
                  dataset_path) -> tuple[np.ndarray, np.ndarray]:
    """``forces`` and ``forces_std`` (n_conf, n_atoms, 3) of one record, checked."""
    if record.key not in f:
        raise DataError(
            f"{path}: no labels for dataset group '{record.key}'"
            + (f" of {dataset_path}" if dataset_path else "")
            + ": the label file was made for another dataset"
        )
    group = f[record.key]
    try:
        forces, std = _compact_rows(group, record, path) if compact else _dense_rows(group, record)
    except (KeyError, IndexError, OSError, RuntimeError) as exc:
        raise DataError(f"{path}: group '{record.key}' is incomplete or corrupt: {exc}") from exc
    expected = (record.num_conformations, len(record.atomic_numbers), 3)
    if forces.shape != expected or std.shape != expected:
        raise DataError(
            f"{path}: group '{record.key}' forces have shape {forces.shape}, the dataset "
            f"needs {expected}: the label file was made for another dataset"
        )
    return forces, std


def read_labels(
    path: str | Path, records: Sequence[MoleculeRecord], dataset_path: str | Path | None = None
) -> list[dict[str, np.ndarray]]:
    """Label arrays aligned with each record's kept conformations, from a file of either layout.

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
    compact = int(metadata.get("version", 0)) >= COMPACT_VERSION
    out = []
    with open_h5(path) as f:
        for record in records:
            forces, std = _group_forces(f, record, path, compact, dataset_path)
            out.append({"forces": forces, "force_var": (std.astype(np.float64) ** 2).mean(-1)})
    return out
