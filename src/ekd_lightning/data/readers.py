"""Readers for the two HDF5 layouts users bring.

1. ANI-1x release layout (``ani1x-release.h5``; ANI-1ccx is its subset with a finite
   ``ccsd(t)_cbs.energy``): one group per formula holding ``atomic_numbers`` (n_atoms,),
   ``coordinates`` (n_conf, n_atoms, 3) in Å, and one array per method/property such as
   ``ccsd(t)_cbs.energy`` (n_conf,) Hartree or ``wb97x_dz.forces`` (n_conf, n_atoms, 3) Hartree/Å,
   with NaN where a method was not computed.
2. ANI/COMP6 benchmark layout: nested groups (subset/molecule) holding ``species`` (element
   symbols as bytes) or ``atomic_numbers``, ``coordinates``, ``energies`` and optional ``forces``.

Both give a list of :class:`MoleculeRecord`. Conformations whose energy (or requested forces) is
not finite are dropped and counted; every other problem raises :class:`DataError` naming the
file, the group and what is wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import DataError
from ..units import symbol_to_number

log = logging.getLogger(__name__)

MIN_DISTANCE = 0.1
"""Two atoms closer than this (Å) make a conformation invalid (duplicated atom)."""


@dataclass
class MoleculeRecord:
    """The usable conformations of one molecule (one HDF5 group).

    Attributes:
        key: HDF5 group path, e.g. ``"C2H6O"`` or ``"s66x8/mol00"``.
        atomic_numbers: (n_atoms,) int64.
        coordinates: (n_conf, n_atoms, 3) float64, Å.
        energies: (n_conf,) float64, Hartree.
        forces: (n_conf, n_atoms, 3) float64 Hartree/Å, or None when the file has none.
        conf_index: (n_conf,) index of each kept conformation in the file's group, so labels
            and predictions can be written back to the same place.
    """

    key: str
    atomic_numbers: np.ndarray
    coordinates: np.ndarray
    energies: np.ndarray
    forces: np.ndarray | None = None
    conf_index: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.conf_index is None:
            self.conf_index = np.arange(len(self.energies))

    @property
    def subset(self) -> str:
        """First path component for nested layouts (the COMP6 subset), else ``""``."""
        return self.key.split("/")[0] if "/" in self.key else ""

    @property
    def num_conformations(self) -> int:
        return len(self.energies)


@dataclass
class ReadReport:
    """What a read dropped, for the log."""

    molecules: int = 0
    conformations: int = 0
    dropped_nonfinite: int = 0
    dropped_elements: int = 0
    dropped_molecules_elements: dict[str, int] = field(default_factory=dict)


def open_h5(path: str | Path) -> h5py.File:
    """Open an HDF5 file read-only; DataError if it is missing, not HDF5, or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {exc}") from exc


def _read(path: Path, group: h5py.Group, key: str) -> np.ndarray:
    if key not in group:
        raise DataError(
            f"{path}: group '{group.name}' has no dataset '{key}'; it has: {sorted(group.keys())}"
        )
    try:
        return group[key][()]
    except (OSError, RuntimeError, ValueError) as exc:
        raise DataError(f"{path}: cannot read '{group.name}/{key}' (corrupt file?): {exc}") from exc


def _species_to_numbers(path: Path, group: h5py.Group, species: np.ndarray) -> np.ndarray:
    numbers = []
    for s in species:
        symbol = s.decode() if isinstance(s, bytes) else str(s)
        try:
            numbers.append(symbol_to_number(symbol.strip()))
        except KeyError:
            raise DataError(f"{path}: group '{group.name}' has unknown element '{symbol}'") from None
    return np.asarray(numbers, dtype=np.int64)


def _check_numbers(path: Path, group: h5py.Group, numbers: np.ndarray) -> np.ndarray:
    numbers = np.asarray(numbers)
    if numbers.ndim != 1 or len(numbers) == 0:
        raise DataError(f"{path}: group '{group.name}' has no atoms (atomic numbers {numbers.shape})")
    if not np.issubdtype(numbers.dtype, np.integer) or numbers.min() < 1 or numbers.max() > 118:
        raise DataError(f"{path}: group '{group.name}' has invalid atomic numbers {numbers.tolist()}")
    return numbers.astype(np.int64)


def _check_shapes(path, group, numbers, coordinates, energies, forces, energy_key, force_key):
    n_atoms = len(numbers)
    where = f"{path}: group '{group.name}'"
    if coordinates.ndim != 3 or coordinates.shape[1:] != (n_atoms, 3):
        raise DataError(
            f"{where}: 'coordinates' has shape {coordinates.shape}, expected (n_conf, {n_atoms}, 3)"
        )
    n_conf = coordinates.shape[0]
    if energies.shape != (n_conf,):
        raise DataError(f"{where}: '{energy_key}' has shape {energies.shape}, expected ({n_conf},)")
    if forces is not None and forces.shape != (n_conf, n_atoms, 3):
        raise DataError(
            f"{where}: '{force_key}' has shape {forces.shape}, expected ({n_conf}, {n_atoms}, 3)"
        )
    if not np.isfinite(coordinates).all():
        bad = np.unique(np.nonzero(~np.isfinite(coordinates))[0]).tolist()[:5]
        raise DataError(f"{where}: 'coordinates' has NaN/inf values (conformations {bad}...)")


def _check_geometry(path: Path, group: h5py.Group, coordinates: np.ndarray) -> None:
    if coordinates.shape[1] < 2:
        return
    diff = coordinates[:, :, None, :] - coordinates[:, None, :, :]
    dist = np.linalg.norm(diff, axis=-1)
    n = coordinates.shape[1]
    dist[:, np.arange(n), np.arange(n)] = np.inf
    close = dist.min(axis=(1, 2)) < MIN_DISTANCE
    if close.any():
        c = int(np.nonzero(close)[0][0])
        i, j = np.unravel_index(np.argmin(dist[c]), dist[c].shape)
        raise DataError(
            f"{path}: group '{group.name}' conformation {c}: atoms {i} and {j} are "
            f"{dist[c, i, j]:.3f} Å apart (below {MIN_DISTANCE} Å: duplicated atom?)"
        )


def _molecule_groups(root: h5py.Group):
    """Yield every group that holds a ``coordinates`` dataset, depth first, in stored order."""
    for name in root:
        item = root.get(name, getlink=False)
        if isinstance(item, h5py.Group):
            if "coordinates" in item:
                yield item
            else:
                yield from _molecule_groups(item)


def detect_format(path: str | Path) -> str:
    """``"ani1x"`` if molecule groups sit at the top level with ``atomic_numbers``, else ``"comp6"``."""
    with open_h5(path) as f:
        for group in _molecule_groups(f):
            top_level = group.name.count("/") == 1
            return "ani1x" if top_level and "atomic_numbers" in group else "comp6"
    raise DataError(f"{path}: no group with a 'coordinates' dataset: not an ANI-1x or COMP6 file")


def _record_from_group(path, group, numbers_key, energy_key, force_key, report) -> MoleculeRecord | None:
    if numbers_key == "species" and "species" not in group and "atomic_numbers" in group:
        numbers_key = "atomic_numbers"
    raw = _read(path, group, numbers_key)
    numbers = _species_to_numbers(path, group, raw) if raw.dtype.kind in "SUO" else raw
    numbers = _check_numbers(path, group, numbers)
    coordinates = np.asarray(_read(path, group, "coordinates"), dtype=np.float64)
    energies = np.asarray(_read(path, group, energy_key), dtype=np.float64)
    forces = None
    if force_key is not None:
        forces = np.asarray(_read(path, group, force_key), dtype=np.float64)
    _check_shapes(path, group, numbers, coordinates, energies, forces, energy_key, force_key)
    finite = np.isfinite(energies)
    if forces is not None:
        finite &= np.isfinite(forces).all(axis=(1, 2))
    report.dropped_nonfinite += int((~finite).sum())
    if not finite.any():
        return None
    keep = np.nonzero(finite)[0]
    coordinates = coordinates[keep]
    _check_geometry(path, group, coordinates)
    return MoleculeRecord(
        key=group.name.lstrip("/"),
        atomic_numbers=numbers,
        coordinates=coordinates,
        energies=energies[keep],
        forces=None if forces is None else forces[keep],
        conf_index=keep,
    )


def read_molecules(
    path: str | Path,
    energy_key: str,
    force_key: str | None = None,
    file_format: str = "auto",
    elements: list[str] | None = None,
) -> tuple[list[MoleculeRecord], ReadReport]:
    """Read every molecule of an ANI-1x-layout or COMP6-layout HDF5 file.

    Args:
        path: the HDF5 file.
        energy_key: energy dataset name, e.g. ``"ccsd(t)_cbs.energy"`` (ANI-1x) or ``"energies"``.
        force_key: optional force dataset name (``"wb97x_dz.forces"``, ``"forces"``).
        file_format: ``"ani1x"``, ``"comp6"`` or ``"auto"`` (:func:`detect_format`).
        elements: keep only molecules made of these element symbols (None keeps all).

    Returns:
        The records (conformations with non-finite energy/forces dropped) and a ReadReport.
    """
    path = Path(path)
    fmt = detect_format(path) if file_format == "auto" else file_format
    if fmt not in ("ani1x", "comp6"):
        raise DataError(f"{path}: unknown file_format '{file_format}' (use ani1x, comp6 or auto)")
    numbers_key = "atomic_numbers" if fmt == "ani1x" else "species"
    allowed = None if elements is None else {symbol_to_number(s) for s in elements}
    report, records = ReadReport(), []
    with open_h5(path) as f:
        groups = list(_molecule_groups(f))
        if not groups:
            raise DataError(f"{path}: no group with a 'coordinates' dataset")
        for group in groups:
            record = _record_from_group(path, group, numbers_key, energy_key, force_key, report)
            if record is None:
                continue
            if allowed is not None and not set(record.atomic_numbers.tolist()) <= allowed:
                report.dropped_elements += record.num_conformations
                report.dropped_molecules_elements[record.key] = record.num_conformations
                continue
            records.append(record)
    report.molecules = len(records)
    report.conformations = sum(r.num_conformations for r in records)
    if not records:
        raise DataError(
            f"{path}: no usable conformation (energy key '{energy_key}'): {report.dropped_nonfinite} "
            f"had non-finite values, {report.dropped_elements} had elements outside {elements}"
        )
    log.info(
        "%s: %d molecules, %d conformations; dropped %d with non-finite values, %d with "
        "elements outside %s", path, report.molecules, report.conformations,
        report.dropped_nonfinite, report.dropped_elements, elements,
    )
    return records, report
