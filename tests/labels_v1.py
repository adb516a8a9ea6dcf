"""A frozen copy of the version-1 (dense) label writer and reader, as ``src/ekd_lightning/labels.py``
had them at commit 75321d8 (before the compact layout): the tests write old files with it, and
``benchmarks/bench_scale.py labels`` times it against today's code in the same process.

Version 1 mirrors every conformation of each dataset group (index = conformation index in the
file), NaN where not labelled, with a ``labelled`` (n_conf,) bool array. Do not edit the logic:
it stands for files already on users' disks. Only the imports differ (h5py and numpy alone, and
the root attributes written here rather than by ``write_metadata``, which now writes version 2).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

UNITS = {"units_energy": "Hartree", "units_forces": "Hartree/Angstrom", "units_length": "Angstrom"}
JSON_ATTRS = ("teachers", "elements")
LABEL_ARRAYS = {
    # name: (dtype, per-teacher, per-atom)
    "forces": (np.float32, False, True),
    "forces_std": (np.float32, False, True),
    "energy": (np.float64, False, False),
    "energy_std": (np.float64, False, False),
    "teacher_forces": (np.float32, True, True),
    "teacher_energy": (np.float64, True, False),
}


def write_metadata_v1(f: h5py.File, metadata: Mapping) -> None:
    f.attrs["format"] = "ekd-labels"
    f.attrs["version"] = 1
    for key, value in {**UNITS, **metadata}.items():
        if key in JSON_ATTRS or isinstance(value, list | tuple | dict):
            value = json.dumps(value, sort_keys=True)
        elif isinstance(value, str):
            value = str(value)
        f.attrs[key] = "" if value is None else value


def _rows(index: np.ndarray):
    if len(index) and index[-1] - index[0] + 1 == len(index):
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def create_label_groups_v1(f: h5py.File, layout: Iterable[tuple[str, int, int]], n_teachers: int) -> None:
    for key, n_conf, n_atoms in layout:
        group = f.create_group(key)
        for name, (dtype, per_teacher, per_atom) in LABEL_ARRAYS.items():
            shape = ((n_teachers,) if per_teacher else ()) + (n_conf,) + ((n_atoms, 3) if per_atom else ())
            group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=np.nan)
        group.create_dataset("labelled", shape=(n_conf,), dtype=bool, fillvalue=False)


def write_label_rows_v1(f: h5py.File, key: str, conf_index: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
    group = f[key]
    rows = _rows(np.asarray(conf_index))
    for name, (_, per_teacher, _) in LABEL_ARRAYS.items():
        if per_teacher:
            group[name][:, rows] = arrays[name]
        else:
            group[name][rows] = arrays[name]
    group["labelled"][rows] = True


def write_labels_v1(
    path: str | Path,
    layout: Sequence[tuple[str, int, int]],
    n_teachers: int,
    blocks: Iterable[tuple[str, np.ndarray, Mapping[str, np.ndarray]]],
    metadata: Mapping,
) -> Path:
    """The version-1 writer: ``layout`` is ``(group key, conformations in the dataset group,
    atoms)`` per molecule, ``blocks`` ``(group key, conformation indices, arrays)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            write_metadata_v1(f, metadata)
            create_label_groups_v1(f, layout, n_teachers)
            for key, conf_index, arrays in blocks:
                write_label_rows_v1(f, key, conf_index, arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_labels_v1(path: str | Path, records) -> list[dict[str, np.ndarray]]:
    """The version-1 reader's arrays (no metadata or dataset checks): per record ``forces``
    (n_conf, n_atoms, 3) and ``force_var`` (n_conf, n_atoms), NaN where not labelled."""
    out = []
    with h5py.File(path, "r") as f:
        for record in records:
            group = f[record.key]
            forces = group["forces"][()][record.conf_index]
            std = group["forces_std"][()][record.conf_index]
            out.append({"forces": forces, "force_var": (std.astype(np.float64) ** 2).mean(-1)})
    return out


def fingerprint_v1(metadata: Mapping) -> str:
    """The ``fingerprint`` 75321d8's ``DistillJob`` gave a labelling run (SHA-256 of its identity,
    ``format_version`` 1), from a label file's root attributes (``read_label_metadata``)."""
    import hashlib

    identity = {"format_version": 1, "dataset_sha256": metadata["dataset_sha256"],
                "energy_key": metadata["energy_key"], "selection": metadata["selection"],
                "teachers": [t["sha256"] for t in metadata["teachers"]],
                "chunk_size": int(metadata["chunk_size"]), "batch_size": int(metadata["batch_size"])}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
