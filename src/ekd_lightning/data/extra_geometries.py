"""Extra geometries labelled by teachers (a file of :mod:`ekd_lightning.distill.augment`), read
for a data module's training split, and their loss weights from teacher agreement.

File layout (format ``ekd-extra-geometries``, version 1): one group per dataset molecule group
(same path, e.g. ``C2H6O``) holding

- ``atomic_numbers`` (n_atoms,) int64;
- ``coordinates`` (n, n_atoms, 3) float32, Å: the extra geometries (labelled at exactly these
  float32 values, the ones a model is trained on);
- ``source_conformation`` (n,) int64: the index, in the dataset group, of the training
  conformation each one was displaced from;
- ``energy``, ``energy_std`` (n,) float64, Hartree: ensemble mean and spread (ddof=0);
- ``forces``, ``forces_std`` (n, n_atoms, 3) float32, Hartree/Å: ensemble mean of -dE/dx and
  its spread.

Root attributes: ``format``, ``version``, units, ``forces_convention`` (``-dE/dx``),
``dataset_path``, ``dataset_sha256``, ``teachers`` (JSON: path, sha256 per teacher), the
settings (``method``, ``displacement``, ``copies``, ``seed``, ``split`` as JSON), ``identity``
(JSON of everything that fixes the content) and its SHA-256 ``fingerprint``, ``created``,
``code_version``. :func:`~ekd_lightning.distill.augment.make_extra_geometries` writes it (in a
folder, under the name ``extra-<fingerprint[:10]>.h5``); :func:`read_extra_geometries` reads it
for a data module, refusing a file made for another dataset or around conformations outside the
data module's training split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..core.errors import DataError, LabelMismatchError
from ..core.hashing import cached_sha256
from ..core.units import HARTREE_TO_KCALMOL as KCAL
from .readers import MoleculeRecord, open_h5

FORMAT = "ekd-extra-geometries"
VERSION = 1


@dataclass
class ExtraGeometries:
    """Extra geometries read back for training (:func:`read_extra_geometries`).

    Attributes:
        records: one per group, ``energies`` the teacher mean (Hartree), ``forces`` None,
            ``conf_index`` 0..n-1 (the rows of the group).
        labels: per record ``{"forces": (n, n_atoms, 3) Hartree/Å, "force_var": (n, n_atoms)
            (Hartree/Å)²}``, the teacher mean and per-atom variance, as
            :func:`~ekd_lightning.data.labels.read_labels` gives them.
        sources: per record, (n,) the dataset conformation each geometry was displaced from.
        force_var: (N,) mean teacher force variance per geometry over atoms and x, y, z,
            (kcal/mol/Å)², in the order of the records.
        weights: (N,) loss weights, set by the data module (:func:`agreement_weights`).
    """

    records: list[MoleculeRecord]
    labels: list[dict[str, np.ndarray]]
    sources: list[np.ndarray]
    force_var: np.ndarray
    weights: np.ndarray | None = None


def agreement_weights(force_var: np.ndarray, weight: float, variance_floor: float) -> np.ndarray:
    """Per-geometry loss weights from teacher agreement: 1 / max(var, floor), normalised to
    mean 1 over the geometries, times ``weight``.

    Args:
        force_var: (N,) mean teacher force variance per geometry, (kcal/mol/Å)².
        weight: the extra geometries' weight relative to a dataset conformation (weight 1).
        variance_floor: (kcal/mol/Å)²; geometries the teachers agree on better than this all
            get the same (largest) weight.

    Returns:
        (N,) float64 weights, mean ``weight``.
    """
    if variance_floor <= 0:
        raise ValueError(f"variance_floor {variance_floor} must be > 0 ((kcal/mol/Å)²)")
    inverse = 1.0 / np.maximum(np.asarray(force_var, dtype=np.float64), variance_floor)
    return weight * inverse / inverse.mean() if len(inverse) else inverse


def read_extra_geometries(path: str | Path, records: Sequence[MoleculeRecord],
                          train_rows: np.ndarray, dataset_path: str | Path) -> ExtraGeometries:
    """Read an extra-geometry file for a data module's dataset and training split.

    Args:
        path: the file (:func:`make_extra_geometries`).
        records: the data module's molecules; ``train_rows`` (n, 2) its training split rows
            (record, position among the kept conformations); ``dataset_path`` its file.

    Raises:
        DataError: not such a file, a group missing from the dataset, shapes or elements that
            differ, or a geometry displaced from a conformation outside the training split
            (a validation or held-out one: it would leak it into training).
        LabelMismatchError: made for another dataset file (SHA-256).
    """
    path = Path(path)
    by_key = {r.key: (m, r) for m, r in enumerate(records)}
    train = {(int(m), int(records[m].conf_index[p])) for m, p in np.asarray(train_rows).reshape(-1, 2)}
    out = ExtraGeometries([], [], [], np.zeros(0))
    variances = []
    with open_h5(path) as f:
        if f.attrs.get("format") != FORMAT or int(f.attrs.get("version", 0)) > VERSION:
            raise DataError(f"{path}: not an extra-geometry file of version <= {VERSION} (root "
                            f"attribute format != '{FORMAT}'); make it with "
                            "pipeline.extra_geometries (ekd_lightning.distill.augment)")
        recorded, actual = f.attrs.get("dataset_sha256"), cached_sha256(dataset_path)
        if recorded != actual:
            raise LabelMismatchError(
                f"{path}: extra geometries made for dataset {f.attrs.get('dataset_path')} "
                f"(sha256 {str(recorded)[:12]}…), but {dataset_path} has sha256 {actual[:12]}…: "
                "make them again for this dataset")
        for key in _groups(f):
            group = f[key]
            if key not in by_key:
                raise DataError(f"{path}: group '{key}' is not a molecule of {dataset_path}: "
                                "the file was made for another dataset or element filter")
            m, record = by_key[key]
            try:
                arrays = {k: group[k][()] for k in ("atomic_numbers", "coordinates",
                                                     "source_conformation", "energy", "forces",
                                                     "forces_std")}
            except (KeyError, OSError) as exc:
                raise DataError(f"{path}: group '{key}' is incomplete or corrupt: {exc}") from exc
            n = len(arrays["energy"])
            if not np.array_equal(arrays["atomic_numbers"], record.atomic_numbers) or \
                    arrays["forces"].shape != (n, len(record.atomic_numbers), 3):
                raise DataError(f"{path}: group '{key}' has other atoms or shapes than {dataset_path}")
            outside = [int(c) for c in arrays["source_conformation"] if (m, int(c)) not in train]
            if outside:
                raise DataError(
                    f"{path}: group '{key}' holds geometries displaced from conformations "
                    f"{outside[:5]}, which are not in this run's training split (validation or "
                    "held-out): they would leak into training; make the file for this split")
            out.records.append(MoleculeRecord(
                key=key, atomic_numbers=record.atomic_numbers,
                coordinates=arrays["coordinates"].astype(np.float64), energies=arrays["energy"]))
            var = arrays["forces_std"].astype(np.float64) ** 2  # (n, n_atoms, 3)
            out.labels.append({"forces": arrays["forces"], "force_var": var.mean(-1)})
            out.sources.append(arrays["source_conformation"])
            variances.append(var.reshape(n, -1).mean(1) * KCAL**2)
    out.force_var = np.concatenate(variances) if variances else np.zeros(0)
    return out


def _groups(f: h5py.File) -> list[str]:
    """Paths of the molecule groups (those holding ``coordinates``), in file order."""
    found = []
    f.visititems(lambda name, item: found.append(name)
                 if isinstance(item, h5py.Group) and "coordinates" in item else None)
    return found
