"""The reference MD is judged against: GFN2-xTB (tblite's ASE calculator), under the same test.

- :func:`reference_runs`: Langevin trajectories of GFN2-xTB run exactly as a model's in the ASE
  path (:func:`ekd_lightning.analysis.md.langevin_run`: same time step, friction, criteria, record
  interval and seeds), so their survival, failure modes and h(r) sit beside each model's. Every
  trajectory is cached on disk (``xtb-<key>.npz`` in the cache folder, written atomically),
  keyed (:func:`ekd_lightning.analysis.md.run_key`) by everything that determines it: the molecule
  (symbols, positions), temperature, seed, steps, time step, friction, record interval, the
  criteria and the tblite version. Replica ``k`` uses seed ``seed + k``.
- :func:`stretch_barriers`: X-H bond-stretch scans (the H moved out along its bond) of models
  and GFN2-xTB; a model whose curve turns over below the reference's has a spurious
  dissociation barrier, where hot MD breaks its bonds.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from ase import Atoms

from ..core.files import write_bytes_atomic
from ..core.units import HARTREE_TO_EV, HARTREE_TO_KCALMOL
from .md import (
    FU_CRITERIA,
    StabilityCriteria,
    add_run,
    empty_result,
    langevin_run,
    molecule_name,
    run_key,
)

log = logging.getLogger(__name__)

REFERENCE_NAME = "GFN2-xTB"
"""The reference's name in the tables."""
EV_TO_KCAL_MOL = HARTREE_TO_KCALMOL / HARTREE_TO_EV


def reference_calculator():
    """tblite's GFN2-xTB ASE calculator (installed by the ``dev`` extra)."""
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def reference_identity() -> str:
    """What computes the reference: the method and the tblite version (part of every key)."""
    from importlib.metadata import version

    return f"{REFERENCE_NAME} tblite {version('tblite')}"


def reference_trajectory(atoms: Atoms, temperature_K: float, steps: int, seed: int = 0,
                         timestep_fs: float = 0.5, friction_per_fs: float = 0.01,
                         record_every: int = 4, criteria: StabilityCriteria = FU_CRITERIA,
                         cache_dir: str | Path | None = None) -> dict:
    """One GFN2-xTB :func:`~ekd_lightning.analysis.md.langevin_run` (row, intact frames, failure
    geometry), read from ``cache_dir`` when it was run before with the same settings."""
    settings = {"temperature_K": float(temperature_K), "steps": steps, "seed": seed,
                "timestep_fs": timestep_fs, "friction_per_fs": friction_per_fs,
                "record_every": record_every, "criteria": asdict(criteria)}
    path = (Path(cache_dir) / f"xtb-{run_key(reference_identity(), [atoms], settings)}.npz"
            if cache_dir else None)
    if path is not None and path.is_file():
        with np.load(path) as saved:
            failed = saved["failed"] if saved["failed"].size else None
            return {"row": json.loads(str(saved["row"])), "intact": saved["intact"], "failed": failed}
    run = langevin_run(reference_calculator(), atoms, temperature_K, seed, steps, timestep_fs,
                       friction_per_fs, criteria, 10 * record_every, record_every)
    run["row"]["molecule"] = molecule_name(atoms)
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, row=json.dumps(run["row"]), intact=np.asarray(run["intact"]),
                 failed=np.zeros(0) if run["failed"] is None else run["failed"])
        write_bytes_atomic(buffer.getvalue(), path)
    return run


def reference_runs(molecules: Sequence[Atoms], temperatures: Sequence[float], replicas: int,
                   steps: int, seed: int = 0, cache_dir: str | Path | None = None,
                   **settings) -> dict:
    """``replicas`` GFN2-xTB trajectories per molecule and temperature (seeds ``seed`` ..
    ``seed + replicas - 1``; ``settings``: timestep_fs, friction_per_fs, record_every, criteria),
    as a result of :func:`ekd_lightning.analysis.md.empty_result` (rows with ``replica``)."""
    result = empty_result()
    for atoms in molecules:
        for temperature in temperatures:
            for k in range(replicas):
                run = reference_trajectory(atoms, temperature, steps, seed + k, cache_dir=cache_dir,
                                           **settings)
                run["row"]["replica"] = k
                add_run(result, run, atoms.numbers)
    return result


# --------------------------------------------------------------------------- bond-stretch scans
def xh_bonds(atoms: Atoms) -> list[tuple[int, int]]:
    """(heavy atom, hydrogen) index pairs of the bonded X-H pairs (ASE natural cutoffs)."""
    from ase.neighborlist import NeighborList, natural_cutoffs

    neighbours = NeighborList(natural_cutoffs(atoms), self_interaction=False, bothways=True)
    neighbours.update(atoms)
    return [(int(x), h) for h in range(len(atoms)) if atoms[h].symbol == "H"
            for x in neighbours.get_neighbors(h)[0] if atoms[int(x)].symbol != "H"]


def stretch_curve(atoms: Atoms, bond: tuple[int, int], calc, stretches: np.ndarray) -> np.ndarray:
    """E(d) − E(0) in kcal/mol, shape (len(stretches),), the H of ``bond`` moved by d Å along it."""
    heavy, hydrogen = bond
    direction = atoms.positions[hydrogen] - atoms.positions[heavy]
    direction /= np.linalg.norm(direction)
    energies = []
    for d in stretches:
        stretched = atoms.copy()
        stretched.positions[hydrogen] += d * direction
        stretched.calc = calc
        energies.append(stretched.get_potential_energy() * EV_TO_KCAL_MOL)
    return np.asarray(energies) - energies[0]


def stretch_barriers(calculators: Mapping[str, object], molecules: Sequence[Atoms],
                     max_stretch: float = 1.0, step: float = 0.05) -> list[dict]:
    """Bond-stretch barriers of each model against GFN2-xTB's, per molecule.

    Args:
        calculators: ``{name: ASE calculator}`` (GFN2-xTB is added as :data:`REFERENCE_NAME`).
        molecules: every X-H bond (:func:`xh_bonds`) of each is scanned from 0 to
            ``max_stretch`` Å in ``step`` Å.

    Returns:
        One row per model and molecule: ``model``, ``molecule``, ``n_bonds``, ``barrier_kcal_mol``
        (mean over bonds of the highest E(d) − E(0) of the scan), ``barrier_reference_kcal_mol``
        (GFN2-xTB's), ``barrier_error_kcal_mol`` (mean of model − reference over bonds: negative
        means a lower, spurious barrier) and ``curve_rmse_kcal_mol`` (of E(d) against
        GFN2-xTB's over every bond and point).
    """
    stretches = np.round(np.arange(0.0, max_stretch + 1e-9, step), 6)
    reference = reference_calculator()
    rows = []
    for atoms in molecules:
        bonds = xh_bonds(atoms)
        ref = np.array([stretch_curve(atoms, b, reference, stretches) for b in bonds])
        for name, calc in {**calculators, REFERENCE_NAME: reference}.items():
            curves = ref if calc is reference else np.array(
                [stretch_curve(atoms, b, calc, stretches) for b in bonds])
            rows.append({"model": name, "molecule": molecule_name(atoms), "n_bonds": len(bonds),
                         "barrier_kcal_mol": float(curves.max(1).mean()),
                         "barrier_reference_kcal_mol": float(ref.max(1).mean()),
                         "barrier_error_kcal_mol": float((curves.max(1) - ref.max(1)).mean()),
                         "curve_rmse_kcal_mol": float(np.sqrt(((curves - ref) ** 2).mean()))})
    return rows
