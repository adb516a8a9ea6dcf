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
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data.readers import MoleculeRecord, open_h5
from .errors import DataError

LABEL_FORMAT = "ekd-labels"
LABEL_VERSION = 1


def read_labels(
    path: str | Path, records: Sequence[MoleculeRecord], dataset_path: str | Path | None = None
) -> list[dict[str, np.ndarray]]:
    """Label arrays aligned with each record's kept conformations.

    Returns one dict per record: ``forces`` (n_conf, n_atoms, 3) Hartree/Å and ``force_var``
    (n_conf, n_atoms) (Hartree/Å)², the per-atom teacher variance averaged over x, y, z; NaN
    where a conformation was not labelled. Raises DataError when the file is not a label file,
    or lacks a group or has wrong shapes for the dataset.
    """
    path = Path(path)
    out = []
    with open_h5(path) as f:
        if f.attrs.get("format") != LABEL_FORMAT:
            raise DataError(f"{path}: not an ekd label file (root attribute format != '{LABEL_FORMAT}')")
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
            except (KeyError, IndexError, OSError) as exc:
                raise DataError(f"{path}: group '{record.key}' is incomplete or corrupt: {exc}") from exc
            expected = (record.num_conformations, len(record.atomic_numbers), 3)
            if forces.shape != expected or std.shape != expected:
                raise DataError(
                    f"{path}: group '{record.key}' forces have shape {forces.shape}, the dataset "
                    f"needs {expected}: the label file was made for another dataset"
                )
            out.append({"forces": forces, "force_var": (std.astype(np.float64) ** 2).mean(-1)})
    return out
