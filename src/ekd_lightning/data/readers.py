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

Force sign convention
---------------------
:class:`MoleculeRecord` always holds true forces F = -dE/dx in Hartree/Å. The real COMP6 v1
files store the energy *gradient* dE/dx under the key ``forces`` (isayev/COMP6 issue #2; the
same fix went into torchmd-net PR #264), so the reader decides per file whether to negate:

* ``forces_are_gradients=True``/``False`` (``data.forces_are_gradients``) says it explicitly;
* otherwise a root attribute ``forces_convention`` decides: ``"-dE/dx"`` (true forces, written by
  :mod:`ekd_lightning.bundled.build` and carried by the bundled ``xtb_comp6.h5``) or ``"dE/dx"``
  (gradients);
* otherwise COMP6-layout files are assumed to be real COMP6 v1 files, i.e. gradients, and a
  warning (once per file) says so and how to override; ANI-1x-layout files are assumed to hold
  forces (the ANI-1x release's ``wb97x_dz.forces`` are -dE/dx).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..core.errors import DataError, EKDError
from ..core.units import number_to_symbol, symbol_to_number

log = logging.getLogger(__name__)

MIN_DISTANCE = 0.1
"""Two atoms closer than this (Å) make a conformation invalid (duplicated atom)."""

FORCES_CONVENTION_ATTR = "forces_convention"
"""Root attribute naming what a file's force datasets hold: one of :data:`FORCES_CONVENTIONS`."""
FORCES_CONVENTIONS = {"-dE/dx": False, "dE/dx": True}
"""Root attribute value -> whether the stored arrays are gradients (to be negated)."""
OTHER_ELEMENTS = ("skip", "error")
_warned_gradient_files: set[str] = set()


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
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an HDF5 file: name the .h5 file itself")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {exc}") from exc


@contextlib.contextmanager
def _h5_errors(path: Path) -> Iterator[None]:
    """Turn the low-level errors h5py raises on a damaged file into DataError naming ``path``."""
    try:
        yield
    except EKDError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise DataError(
            f"{path}: cannot read the file (truncated or corrupt HDF5?): {type(exc).__name__}: {exc}"
        ) from exc


def _read(path: Path, group: h5py.Group, key: str) -> np.ndarray:
    if key not in group:
        raise DataError(
            f"{path}: group '{group.name}' has no dataset '{key}'; it has: {sorted(group.keys())}"
        )
    item = group.get(key)
    if not isinstance(item, h5py.Dataset):
        raise DataError(f"{path}: '{group.name}/{key}' is not a dataset ({type(item).__name__})")
    try:
        value = item[()]
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: cannot read '{group.name}/{key}' (corrupt file?): {exc}") from exc
    if isinstance(value, h5py.Empty) or not isinstance(value, np.ndarray):
        raise DataError(f"{path}: '{group.name}/{key}' holds no array (shape {item.shape})")
    return value


def _read_float(path: Path, group: h5py.Group, key: str) -> np.ndarray:
    """A dataset as float64; DataError if its dtype is not numeric (strings, compounds)."""
    value = _read(path, group, key)
    if value.dtype.kind not in "biuf":
        raise DataError(
            f"{path}: '{group.name}/{key}' has dtype {value.dtype}, expected real numbers"
        )
    return value.astype(np.float64)


def _species_to_numbers(path: Path, group: h5py.Group, species: np.ndarray,
                        key: str = "species") -> np.ndarray:
    if species.ndim != 1:
        raise DataError(
            f"{path}: group '{group.name}' has '{key}' of shape {species.shape}, expected (n_atoms,)"
        )
    numbers = []
    for s in species:
        try:
            symbol = s.decode() if isinstance(s, bytes) else str(s)
        except UnicodeDecodeError:
            symbol = repr(s)
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
    if len(numbers) == 1:
        raise DataError(
            f"{path}: group '{group.name}' is a single atom ({number_to_symbol(int(numbers[0]))}): "
            "an interatomic potential needs at least two atoms per molecule; remove the group"
        )
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


GEOMETRY_CHUNK = 1 << 21
"""Pair distances computed at once by :func:`_check_geometry` (bounds its memory to ~50 MB)."""


def _check_geometry(path: Path, group: h5py.Group, coordinates: np.ndarray) -> None:
    """DataError for the first conformation with two atoms closer than :data:`MIN_DISTANCE`.

    Works on the n(n-1)/2 atom pairs of a block of conformations at a time, so its memory is
    bounded whatever the group's size (coordinates (n_conf, n_atoms, 3), Å).
    """
    n = coordinates.shape[1]
    if n < 2:
        return
    i, j = np.triu_indices(n, k=1)
    step = max(1, GEOMETRY_CHUNK // len(i))
    for lo in range(0, len(coordinates), step):
        diff = coordinates[lo:lo + step, i] - coordinates[lo:lo + step, j]
        squared = np.einsum("cpk,cpk->cp", diff, diff)  # (block, n_pairs) Å²
        close = squared.min(axis=1) < MIN_DISTANCE**2
        if close.any():
            c = int(np.nonzero(close)[0][0])
            p = int(np.argmin(squared[c]))
            raise DataError(
                f"{path}: group '{group.name}' conformation {lo + c}: atoms {i[p]} and {j[p]} are "
                f"{np.sqrt(squared[c, p]):.3f} Å apart (below {MIN_DISTANCE} Å: duplicated atom?)"
            )


def closest_pair(positions: np.ndarray, cell: np.ndarray | None = None,
                 pbc: Sequence[bool] | None = None) -> tuple[int, int, float] | None:
    """The closest pair of atoms (i, j, distance Å) of one structure (positions (n_atoms, 3) Å)
    closer than :data:`MIN_DISTANCE`, the distance below which training refuses a
    conformation; None if there is none. With a periodic ``cell`` ((3, 3) Å, vectors as rows)
    and ``pbc`` (3 bools), periodic images count (vesin's neighbour list)."""
    positions = np.asarray(positions, dtype=np.float64)
    if pbc is not None and any(pbc):
        from vesin import NeighborList

        i, j, squared = NeighborList(cutoff=MIN_DISTANCE, full_list=False).compute(
            positions, np.asarray(cell, dtype=np.float64), [bool(p) for p in pbc], quantities="ijd")
        squared = squared**2
    elif len(positions) < 2:
        return None
    else:
        i, j = np.triu_indices(len(positions), k=1)
        squared = ((positions[i] - positions[j]) ** 2).sum(-1)
    if len(squared) == 0:
        return None
    p = int(np.argmin(squared))
    return (int(i[p]), int(j[p]), float(np.sqrt(squared[p]))) if squared[p] < MIN_DISTANCE**2 else None


_MOLECULE_KEYS = ("coordinates", "species", "atomic_numbers")


def _molecule_groups(root: h5py.Group):
    """Yield every molecule group, depth first, in stored order: a group holding
    ``coordinates``, ``species`` or ``atomic_numbers`` (one without ``coordinates`` is yielded
    too, so that reading it raises a DataError instead of silently losing the molecule)."""
    for name in root:
        item = root.get(name, getlink=False)
        if isinstance(item, h5py.Group):
            if any(key in item for key in _MOLECULE_KEYS):
                yield item
            else:
                yield from _molecule_groups(item)


def detect_format(path: str | Path) -> str:
    """``"ani1x"`` if molecule groups sit at the top level with ``atomic_numbers``, else ``"comp6"``."""
    path = Path(path)
    with open_h5(path) as f, _h5_errors(path):
        for group in _molecule_groups(f):
            top_level = group.name.count("/") == 1
            return "ani1x" if top_level and "atomic_numbers" in group else "comp6"
    raise DataError(f"{path}: no group with a 'coordinates' dataset: not an ANI-1x or COMP6 file")


def forces_are_gradients_of(
    path: str | Path, f: h5py.File, file_format: str, forces_are_gradients: bool | None = None
) -> bool:
    """Whether ``path``'s force datasets hold gradients dE/dx (to be negated into forces).

    The explicit ``forces_are_gradients`` wins; else the root attribute ``forces_convention``
    (``"-dE/dx"``: forces, ``"dE/dx"``: gradients); else True for the COMP6 layout (the real
    COMP6 v1 files store gradients; a warning once per file says so) and False for ANI-1x.
    """
    if forces_are_gradients is not None:
        return bool(forces_are_gradients)
    value = f.attrs.get(FORCES_CONVENTION_ATTR)
    if value is not None:
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if not isinstance(value, str) or value not in FORCES_CONVENTIONS:
            shown = value if isinstance(value, str) else getattr(value, "tolist", lambda: value)()
            raise DataError(
                f"{path}: root attribute {FORCES_CONVENTION_ATTR}={shown!r} is not one of "
                f"{sorted(FORCES_CONVENTIONS)}; fix it, or set data.forces_are_gradients"
            )
        return FORCES_CONVENTIONS[value]
    if file_format != "comp6":
        return False
    key = str(Path(path).resolve())
    if key not in _warned_gradient_files:
        _warned_gradient_files.add(key)
        log.warning(
            "%s: COMP6-layout file without a '%s' root attribute: assuming its force arrays are "
            "energy gradients dE/dx as in the real COMP6 v1 files, and negating them into forces. "
            "If the file holds true forces -dE/dx, set data.forces_are_gradients=false (or "
            "forces_are_gradients=False), or add the root attribute %s='-dE/dx'.",
            path, FORCES_CONVENTION_ATTR, FORCES_CONVENTION_ATTR,
        )
    return True


def _record_from_group(path, group, numbers_key, energy_key, force_key, report,
                       negate_forces: bool = False) -> MoleculeRecord | None:
    if numbers_key == "species" and "species" not in group and "atomic_numbers" in group:
        numbers_key = "atomic_numbers"
    if numbers_key == "atomic_numbers" and "atomic_numbers" not in group and "species" in group:
        numbers_key = "species"
    raw = _read(path, group, numbers_key)
    numbers = _species_to_numbers(path, group, raw, numbers_key) if raw.dtype.kind in "SUO" else raw
    numbers = _check_numbers(path, group, numbers)
    energies = _read_float(path, group, energy_key)
    if energies.ndim == 1 and not np.isfinite(energies).any():
        report.dropped_nonfinite += len(energies)  # (ANI-1x: most groups lack CC energies)
        return None
    coordinates = _read_float(path, group, "coordinates")
    forces = None
    if force_key is not None:
        forces = _read_float(path, group, force_key)
        if negate_forces:
            forces = -forces
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


def check_elements(
    path: str | Path, records: list[MoleculeRecord], elements: list[str] | tuple[str, ...]
) -> None:
    """DataError naming the first molecule (file, group) holding an element outside ``elements``.

    Use before handing records to a model whose element list is ``elements``.
    """
    allowed = {symbol_to_number(s) for s in elements}
    for record in records:
        other = sorted(set(record.atomic_numbers.tolist()) - allowed)
        if other:
            raise DataError(_element_message(path, record.key, other, elements))


def _element_message(path, key: str, numbers: list[int], elements) -> str:
    symbols = [number_to_symbol(z) for z in numbers]
    return (
        f"{path}: group '/{key}' contains element(s) {symbols}, not among the model's elements "
        f"{list(elements)}; skip such molecules by reading with data.elements={list(elements)} "
        "(molecules with other elements are then left out and counted), or train a model whose "
        f"data.elements include {symbols}"
    )


def read_molecules(
    path: str | Path,
    energy_key: str,
    force_key: str | None = None,
    file_format: str = "auto",
    elements: list[str] | None = None,
    forces_are_gradients: bool | None = None,
    other_elements: str = "skip",
) -> tuple[list[MoleculeRecord], ReadReport]:
    """Read every molecule of an ANI-1x-layout or COMP6-layout HDF5 file.

    Args:
        path: the HDF5 file.
        energy_key: energy dataset name, e.g. ``"ccsd(t)_cbs.energy"`` (ANI-1x) or ``"energies"``;
            (n_conf,) Hartree.
        force_key: optional force dataset name (``"wb97x_dz.forces"``, ``"forces"``);
            (n_conf, n_atoms, 3) Hartree/Å.
        file_format: ``"ani1x"``, ``"comp6"`` or ``"auto"`` (:func:`detect_format`).
        elements: keep only molecules made of these element symbols (None keeps all).
        forces_are_gradients: whether the force datasets hold dE/dx (negated on reading) rather
            than forces -dE/dx; None follows the root attribute ``forces_convention``, else
            assumes gradients for the COMP6 layout (with a warning) and forces for ANI-1x (see
            the module docstring). The records always hold forces F = -dE/dx.
        other_elements: with ``elements``, ``"skip"`` leaves molecules with other elements out
            (counted in the report, and a warning names them), ``"error"`` raises DataError.

    Returns:
        The records (conformations with non-finite energy/forces dropped) and a ReadReport.
    """
    path = Path(path)
    fmt = detect_format(path) if file_format == "auto" else file_format
    if fmt not in ("ani1x", "comp6"):
        raise DataError(f"{path}: unknown file_format '{file_format}' (use ani1x, comp6 or auto)")
    if other_elements not in OTHER_ELEMENTS:
        raise ValueError(f"other_elements '{other_elements}' is not one of {OTHER_ELEMENTS}")
    numbers_key = "atomic_numbers" if fmt == "ani1x" else "species"
    allowed = None if elements is None else {symbol_to_number(s) for s in elements}
    report, records = ReadReport(), []
    other_found: dict[str, list[int]] = {}
    with open_h5(path) as f, _h5_errors(path):
        negate = force_key is not None and forces_are_gradients_of(path, f, fmt, forces_are_gradients)
        groups = list(_molecule_groups(f))
        if not groups:
            raise DataError(f"{path}: no group with a 'coordinates' dataset")
        for group in groups:
            record = _record_from_group(
                path, group, numbers_key, energy_key, force_key, report, negate_forces=negate
            )
            if record is None:
                continue
            other = set() if allowed is None else set(record.atomic_numbers.tolist()) - allowed
            if other:
                if other_elements == "error":
                    raise DataError(_element_message(path, record.key, sorted(other), elements))
                report.dropped_elements += record.num_conformations
                report.dropped_molecules_elements[record.key] = record.num_conformations
                other_found[record.key] = sorted(other)
                continue
            records.append(record)
    report.molecules = len(records)
    report.conformations = sum(r.num_conformations for r in records)
    found = sorted({number_to_symbol(z) for zs in other_found.values() for z in zs})
    if other_found:
        keys = list(other_found)
        log.warning(
            "%s: %d molecules (%d conformations) contain elements %s outside data.elements=%s and "
            "are left out: %s%s; add the elements to data.elements to use them",
            path, len(keys), report.dropped_elements, found, list(elements), keys[:5],
            " ..." if len(keys) > 5 else "",
        )
    if not records:
        raise DataError(
            f"{path}: no usable conformation (energy key '{energy_key}'): {report.dropped_nonfinite} "
            f"had non-finite values, {report.dropped_elements} had elements {found} outside "
            f"{elements} (set data.elements to include them)"
        )
    log.info(
        "%s: %d molecules, %d conformations; dropped %d with non-finite values, %d with "
        "elements outside %s; forces %s", path, report.molecules, report.conformations,
        report.dropped_nonfinite, report.dropped_elements, elements,
        "n/a" if force_key is None else ("negated (file holds dE/dx)" if negate else "as stored"),
    )
    return records, report
