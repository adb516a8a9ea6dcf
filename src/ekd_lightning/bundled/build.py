"""Deterministic builder for the bundled GFN2-xTB dataset.

Two HDF5 files are written (see :mod:`ekd_lightning.bundled` for the description of the data):

* ``xtb_train.h5`` in the ANI-1x release layout: one group per molecular formula holding
  ``atomic_numbers`` (n_atoms,) int64, ``coordinates`` (n_conf, n_atoms, 3) float64 Å,
  ``gfn2_xtb.energy`` (n_conf,) float64 Hartree and ``gfn2_xtb.forces`` (n_conf, n_atoms, 3)
  float64 Hartree/Å.  Atoms are sorted by atomic number, descending (stable).
* ``xtb_comp6.h5`` in the COMP6 v1 layout: ``subset/molNN`` groups holding ``species``
  (n_atoms,) ``|S1`` element symbols, ``coordinates`` float32 Å, ``energies`` float64 Hartree
  and ``forces`` float32 Hartree/Å.  Labels are computed at the float32-rounded coordinates.
  Unlike the real COMP6 v1 files, whose ``forces`` hold the energy gradient dE/dx, these are
  true forces -dE/dx, and the root attribute ``forces_convention = "-dE/dx"`` says so (the
  project's reader follows it; see :mod:`ekd_lightning.data.readers`).

Pipeline per molecule: SMILES -> RDKit (AddHs, ETKDGv3 embedding with a fixed seed, MMFF
optimisation) -> light GFN2-xTB optimisation (ASE BFGS) -> conformation sampling with Langevin
MD on the xTB surface and/or harmonic normal-mode sampling. All randomness comes from numpy
Generators seeded with a SHA-256 hash of the SMILES, and every molecule is computed in a
single-threaded worker process, so the arrays do not depend on ``--workers``.

CLI::

    python -m ekd_lightning.bundled.build --out-dir DIR [--preset NAME] [--workers N]

The ``second`` preset is an independent dataset for checking conclusions on data no one tuned
to: other molecules (:data:`SECOND_TRAIN_SMILES` etc., disjoint from the bundled lists) and
another seed salt: 4,080 training conformations of 51 molecules and 284 test conformations of
30 molecules, 2.9 MB. It is not shipped: ``--preset second`` builds it (31.8 min with 2 workers
on a shared 2-core machine at load 13-15).

Issue 24's data levers: ``stretched`` and ``second_stretched`` add to ``default`` and ``second``
(their arrays unchanged) frames with one terminal bond pulled out 0.1-0.8 Å (``stretched``:
287 s with 2 workers; ``second_stretched``: 686 s with 1 worker beside two trainings);
``ani1_nms`` draws the training normal-mode frames with ANI-1's generator (943 s with 1 worker
beside two trainings); ``stretched_shift`` and ``second_stretched_shift`` add to the stretched
presets as many frames with an H on a 1,2-shift path (``second_stretched_shift``: 854 s with 1
worker beside three trainings). Results: docs/md-stability-results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes

from ..core.files import atomic_path
from .presets import MD_SUBSET, PRESETS, S66_SCALES, Preset, stable_seed  # noqa: F401  (build.PRESETS, ...)

BOHR = float(units.Bohr)
"""1 Bohr in Å."""
KB_HARTREE = float(units.kB / units.Hartree)
"""Boltzmann constant in Hartree/K."""
MDYN_PER_A = 0.2293710
"""1 mdyn/Å in Hartree/Å²."""
TRAIN_NAME = "xtb_train.h5"
TEST_NAME = "xtb_comp6.h5"
ENERGY_KEY = "gfn2_xtb.energy"
FORCE_KEY = "gfn2_xtb.forces"
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
DIMER_SUBSET = "xtb_pair_scans"
"""Test subset of dimer distance scans."""
COMP6_FORCES_CONVENTION = ("forces_convention", "-dE/dx")
"""Root attribute of the COMP6-layout file: its ``forces`` are true forces F = -dE/dx."""

# --------------------------------------------------------------------------------------------
# xTB
# --------------------------------------------------------------------------------------------


def tblite_version() -> str:
    """Installed tblite version, e.g. ``"0.8.0"``."""
    return importlib.metadata.version("tblite")


class XtbEngine:
    """One tblite GFN2-xTB calculator for a fixed molecule; every call is a fresh SCC."""

    def __init__(self, numbers: np.ndarray, positions: np.ndarray, accuracy: float = 0.1):
        from tblite.interface import Calculator as TBCalculator

        self.calc = TBCalculator("GFN2-xTB", np.asarray(numbers), np.asarray(positions) / BOHR)
        self.calc.set("verbosity", 0)
        self.calc.set("accuracy", accuracy)
        self.calls = 0

    def __call__(self, positions: np.ndarray) -> tuple[float, np.ndarray]:
        """Energy (Hartree) and forces ((n_atoms, 3) Hartree/Å) at positions (n_atoms, 3) Å."""
        self.calc.update(np.ascontiguousarray(positions, dtype=np.float64) / BOHR)
        res = self.calc.singlepoint()
        self.calls += 1
        return float(res.get("energy")), -np.asarray(res.get("gradient")) / BOHR


def xtb_energy_forces(numbers: np.ndarray, positions: np.ndarray) -> tuple[float, np.ndarray]:
    """GFN2-xTB energy (Hartree) and forces (Hartree/Å) of one structure (positions in Å)."""
    return XtbEngine(numbers, positions)(positions)


class XtbAseCalculator(Calculator):
    """ASE wrapper of an :class:`XtbEngine` (ASE units: eV, eV/Å)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, engine: XtbEngine):
        super().__init__()
        self.engine = engine

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        energy, forces = self.engine(self.atoms.positions)
        self.results = {"energy": energy * units.Hartree, "forces": forces * units.Hartree}


# --------------------------------------------------------------------------------------------
# Structures
# --------------------------------------------------------------------------------------------


def embed_smiles(smiles: str, seed: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """RDKit 3D structure of one molecule: (atomic numbers, positions Å, bonded index pairs);
    ``seed``: the embedding seed (default ``stable_seed("embed", smiles)``)."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = (stable_seed("embed", smiles) if seed is None else seed) % (2**31)
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise RuntimeError(f"RDKit could not embed {smiles!r}")
    AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    bonds = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]
    return numbers, mol.GetConformer().GetPositions(), bonds


def formula(smiles: str) -> str:
    """Hill formula of a SMILES with explicit hydrogens counted, e.g. ``"C2H6O"``."""
    from rdkit import Chem
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    return CalcMolFormula(Chem.MolFromSmiles(smiles))


def canonical(smiles: str) -> str:
    """RDKit canonical SMILES (isomeric)."""
    from rdkit import Chem

    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles))


def optimise(engine: XtbEngine, numbers: np.ndarray, positions: np.ndarray, steps: int) -> np.ndarray:
    """Light GFN2-xTB optimisation (ASE BFGS, fmax 0.01 eV/Å, at most ``steps``); Å."""
    from ase.optimize import BFGS

    atoms = Atoms(numbers=numbers, positions=positions, calculator=XtbAseCalculator(engine))
    BFGS(atoms, logfile=None).run(fmax=0.01, steps=steps)
    return atoms.positions.copy()


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def place_dimer(pos_a: np.ndarray, pos_b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Both monomers centred, B randomly rotated and moved along a random direction until the
    closest A-B contact is 2.2 Å. Returns the (n_a + n_b, 3) positions, Å."""
    a = pos_a - pos_a.mean(0)
    b = (pos_b - pos_b.mean(0)) @ _random_rotation(rng).T
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _contact(a, b + mid * direction) < 2.2 else (lo, mid)
    return np.vstack([a, b + hi * direction])


def _contact(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a[:, None] - b[None], axis=-1).min())


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def langevin_frames(engine, numbers, positions, rng, temp, frames, stride, equil) -> np.ndarray:
    """Langevin MD at ``temp`` K (0.5 fs, friction 0.02/fs): after ``equil`` steps, ``frames``
    snapshots ``stride`` steps apart. Returns (frames, n_atoms, 3) positions, Å."""
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    atoms = Atoms(numbers=numbers, positions=positions, calculator=XtbAseCalculator(engine))
    MaxwellBoltzmannDistribution(atoms, temperature_K=temp, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    atoms.set_constraint(FixCom())
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temp, friction=0.02 / units.fs,
                   fixcm=False, rng=rng)
    dyn.run(equil)
    out = []
    for _ in range(frames):
        dyn.run(stride)
        out.append(atoms.positions.copy())
    return np.array(out)


def hessian(engine: XtbEngine, positions: np.ndarray, step: float = 0.005) -> np.ndarray:
    """Cartesian Hessian (3N, 3N), Hartree/Å², by central differences of xTB forces."""
    n = positions.size
    hess = np.empty((n, n))
    for i in range(n):
        d = np.zeros(n)
        d[i] = step
        f_plus = engine(positions + d.reshape(positions.shape))[1]
        f_minus = engine(positions - d.reshape(positions.shape))[1]
        hess[i] = -(f_plus - f_minus).ravel() / (2 * step)
    return 0.5 * (hess + hess.T)


def vibrational_modes(positions: np.ndarray, hess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Force constants (n_vib,) Hartree/Å² and orthonormal Cartesian modes (3N, n_vib), with
    translations and rotations projected out (n_vib = 3N-6, or 3N-5 for linear molecules)."""
    centred = positions - positions.mean(0)
    vectors = [np.tile(np.eye(3)[k], len(positions)) for k in range(3)]
    vectors += [np.cross(np.eye(3)[k], centred).ravel() for k in range(3)]
    u, s, _ = np.linalg.svd(np.array(vectors).T, full_matrices=False)
    tr = u[:, s > 1e-6 * s.max()]
    w, v = np.linalg.eigh(np.eye(len(hess)) - tr @ tr.T)
    basis = v[:, w > 0.5]
    k, modes = np.linalg.eigh(basis.T @ hess @ basis)
    return k, basis @ modes


def bonds_ok(positions: np.ndarray, ref: np.ndarray, bonds: list[tuple[int, int]]) -> bool:
    """Bond lengths within 0.8-1.3x the reference and no two atoms closer than 0.7 Å."""
    dist = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    if dist.min() < 0.7:
        return False
    i, j = np.array(bonds, dtype=int).reshape(-1, 2).T
    ratio = dist[i, j] / np.linalg.norm(ref[i] - ref[j], axis=-1)
    return bool(np.all((ratio > 0.8) & (ratio < 1.3)))


def normal_mode_frames(engine, positions, bonds, rng, frames, temps, e_cap=0.08) -> np.ndarray:
    """Harmonic Boltzmann samples around a minimum: displacements q_i ~ N(0, kT / k_i) along
    each normal mode (k_i floored at 0.03 Hartree/Å² so soft torsions stay sane), T uniform in
    ``temps`` K per sample; rejects broken bonds and energies > ``e_cap`` Hartree above the
    reference. Returns (frames, n_atoms, 3) positions, Å."""
    e_ref = engine(positions)[0]
    k, modes = vibrational_modes(positions, hessian(engine, positions))
    k = np.maximum(k, 0.03)
    out: list[np.ndarray] = []
    for _ in range(50 * frames):
        if len(out) == frames:
            break
        kt = KB_HARTREE * rng.uniform(*temps)
        trial = positions + (modes @ (rng.standard_normal(len(k)) * np.sqrt(kt / k))).reshape(-1, 3)
        if bonds_ok(trial, positions, bonds) and engine(trial)[0] - e_ref < e_cap:
            out.append(trial)
    if len(out) < frames:
        raise RuntimeError(f"normal-mode sampling accepted only {len(out)}/{frames} samples")
    return np.array(out)


def ani1_normal_mode_frames(numbers, positions, k, modes, rng, frames, temps) -> np.ndarray:
    """ANI-1's normal-mode sampling (Smith, Isayev, Roitberg, Chem. Sci. 2017, 8, 3192) as its
    published generator does it: R_i = ±sqrt(3 c_i N_a k_B T / K_i) along each mode (force
    constants ``k`` (n_vib,) Hartree/Å², floored at 1e-3 mdyn/Å; at most 2 Å), the c_i a random
    partition of a random fraction of 1, T uniform in ``temps`` K; rejects atoms closer than
    0.006 Z_i Z_j + 0.6 Å or moved more than 2 Å. No energy cap. Unlike :func:`normal_mode_frames`
    it moves soft modes (torsions) far along their linearised direction, which also stretches
    the bonds they swing. Returns (frames, n_atoms, 3) positions, Å."""
    k = np.maximum(k, 1e-3 * MDYN_PER_A)
    close = 0.006 * np.outer(numbers, numbers) + 0.6
    np.fill_diagonal(close, 0.0)
    out: list[np.ndarray] = []
    for _ in range(100 * frames):
        if len(out) == frames:
            break
        total = rng.random()
        cuts = total * np.sort(rng.random(len(k) + 1))
        cuts[0], cuts[-1] = 0.0, total
        twice_energy = 3.0 * np.diff(cuts) * len(numbers) * KB_HARTREE * rng.uniform(*temps)
        amplitude = rng.choice([-1.0, 1.0], len(k)) * np.minimum(np.sqrt(twice_energy / k), 2.0)
        trial = positions + (modes @ amplitude).reshape(-1, 3)
        dist = np.linalg.norm(trial[:, None] - trial[None], axis=-1)
        if (dist >= close).all() and np.linalg.norm(trial - positions, axis=1).max() <= 2.0:
            out.append(trial)
    if len(out) < frames:
        raise RuntimeError(f"ANI-1 normal-mode sampling accepted only {len(out)}/{frames} samples")
    return np.array(out)


def terminal_bonds(numbers: np.ndarray, bonds: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Bonds to a terminal atom (one bond), as (anchor, terminal) index pairs: every X-H and,
    e.g., a carbonyl O; the terminal atom can be pulled out along its bond alone."""
    degree = np.bincount(np.array(bonds, dtype=int).ravel(), minlength=len(numbers))
    pairs = []
    for i, j in bonds:
        if degree[j] == 1 and (degree[i] > 1 or numbers[j] <= numbers[i]):
            pairs.append((i, j))
        elif degree[i] == 1:
            pairs.append((j, i))
    return pairs


def stretched_frames(numbers, bases, bonds, rng, frames, stretch) -> np.ndarray:
    """Thermal frames with one terminal bond pulled out: a random base frame (n_bases, n_atoms,
    3) Å, a random bond of :func:`terminal_bonds`, its terminal atom moved along the bond by
    ``delta`` ~ U(``stretch``) Å. Where hot MD breaks a model (X-H bonds 0.5 Å long) and no
    thermal sample goes. Returns (frames, n_atoms, 3) positions, Å."""
    pairs = terminal_bonds(numbers, bonds)
    out = np.empty((frames, len(numbers), 3))
    for n in range(frames):
        x = bases[rng.integers(len(bases))].copy()
        anchor, end = pairs[rng.integers(len(pairs))]
        axis = x[end] - x[anchor]
        x[end] += rng.uniform(*stretch) * axis / np.linalg.norm(axis)
        out[n] = x
    return out


def shift_paths(numbers: np.ndarray, bonds: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """1,2-hydrogen shifts a molecule allows, as (donor, hydrogen, acceptor) index triples: an H
    bonded to heavy atom X, and a heavy atom Y bonded to X (the path of every hydrogen transfer
    seen in hot model MD: C-H to O, C-H to N, N-H to C)."""
    neighbours: dict[int, set[int]] = {k: set() for k in range(len(numbers))}
    for i, j in bonds:
        neighbours[i].add(j)
        neighbours[j].add(i)
    return [(x, h, y) for h in range(len(numbers)) if numbers[h] == 1
            for x in sorted(neighbours[h]) if numbers[x] != 1
            for y in sorted(neighbours[x]) if y != h and numbers[y] != 1]


def hydrogen_shift_frames(numbers, bases, bonds, rng, frames, height, closest=0.9) -> np.ndarray:
    """Thermal frames with one H moved onto a 1,2-shift path from its heavy atom X towards a
    heavy neighbour Y of X (:func:`shift_paths`): placed at X + t (Y - X) + h n, where n is the
    unit vector from the X-Y axis to the H in the base frame, t ~ U(0.15, 0.85) and h ~
    U(``height``) Å, redrawn while the H is nearer than ``closest`` Å to any atom: the bridged
    geometries a hydrogen transfer passes, where no thermal sample goes. ``bases`` (n_bases,
    n_atoms, 3) Å. Returns (frames, n_atoms, 3) positions, Å."""
    paths = shift_paths(numbers, bonds)
    out = np.empty((frames, len(numbers), 3))
    for n in range(frames):
        for _ in range(1000):
            x = bases[rng.integers(len(bases))].copy()
            donor, h, acceptor = paths[rng.integers(len(paths))]
            axis = x[acceptor] - x[donor]
            off_axis = x[h] - x[donor] - axis * np.dot(x[h] - x[donor], axis) / np.dot(axis, axis)
            along, off = rng.uniform(0.15, 0.85), rng.uniform(*height)
            x[h] = x[donor] + along * axis + off * off_axis / np.linalg.norm(off_axis)
            if np.delete(np.linalg.norm(x - x[h], axis=1), h).min() >= closest:
                break
        else:
            raise RuntimeError(f"no hydrogen-shift frame keeps its H {closest} Å from every atom")
        out[n] = x
    return out


# --------------------------------------------------------------------------------------------
# Jobs (one molecule each, run in worker processes)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One molecule to compute. ``kind``: train | nm | md | dimer; ``key``: HDF5 group path."""

    kind: str
    key: str
    smiles: str
    preset: Preset


@dataclass
class Sample:
    """Computed conformations of one molecule.

    numbers (n_atoms,) int64; coordinates (n_conf, n_atoms, 3) Å; energies (n_conf,) Hartree;
    forces (n_conf, n_atoms, 3) Hartree/Å; ``sampling`` says how the conformations were made.
    """

    key: str
    smiles: str
    numbers: np.ndarray
    coordinates: np.ndarray
    energies: np.ndarray
    forces: np.ndarray
    sampling: str


def label(engine: XtbEngine, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies (n,) Hartree and forces (n, n_atoms, 3) Hartree/Å of frames (n, n_atoms, 3) Å."""
    results = [engine(x) for x in frames]
    return np.array([r[0] for r in results]), np.array([r[1] for r in results])


def _prepared(job: Job) -> tuple[np.ndarray, np.ndarray, list, XtbEngine, np.random.Generator]:
    numbers, positions, bonds = embed_smiles(job.smiles, job.preset.seed("embed", job.smiles))
    engine = XtbEngine(numbers, positions)
    positions = optimise(engine, numbers, positions, job.preset.opt_steps)
    return numbers, positions, bonds, engine, np.random.default_rng(job.preset.seed(job.kind, job.smiles))


def sample_train(job: Job) -> Sample:
    """MD at each ``md_temps`` plus normal-mode samples, then ``stretch_frames`` MD frames with a
    terminal bond pulled out and ``shift_frames`` with an H moved along a 1,2-shift path (each
    from its own seed, so the other arrays do not change); atoms sorted by Z descending."""
    p = job.preset
    numbers, positions, bonds, engine, rng = _prepared(job)
    parts = [
        langevin_frames(engine, numbers, positions, rng, t, p.md_frames, p.md_stride, p.md_equil)
        for t in p.md_temps
    ]
    md = np.concatenate(parts)
    sampling = [f"md{t:g}K:{p.md_frames}" for t in p.md_temps]
    if p.nm_scheme == "ani1":
        k, modes = vibrational_modes(positions, hessian(engine, positions))
        parts.append(ani1_normal_mode_frames(numbers, positions, k, modes, rng, p.nm_frames, p.nm_temps))
        sampling.append(f"ani1-nm{p.nm_temps[0]:g}-{p.nm_temps[1]:g}K:{p.nm_frames}")
    else:
        parts.append(normal_mode_frames(engine, positions, bonds, rng, p.nm_frames, p.nm_temps))
        sampling.append(f"nm{p.nm_temps[0]:g}-{p.nm_temps[1]:g}K:{p.nm_frames}")
    if p.stretch_frames:
        stretch_rng = np.random.default_rng(p.seed("stretch", job.smiles))
        parts.append(stretched_frames(numbers, md, bonds, stretch_rng, p.stretch_frames, p.stretch))
        sampling.append(f"stretch{p.stretch[0]:g}-{p.stretch[1]:g}A:{p.stretch_frames}")
    if p.shift_frames and shift_paths(numbers, bonds):
        shift_rng = np.random.default_rng(p.seed("shift", job.smiles))
        parts.append(hydrogen_shift_frames(numbers, md, bonds, shift_rng, p.shift_frames, p.shift_height))
        sampling.append(f"hshift{p.shift_height[0]:g}-{p.shift_height[1]:g}A:{p.shift_frames}")
    frames = np.concatenate(parts)
    energies, forces = label(engine, frames)
    order = np.argsort(-numbers, kind="stable")
    sampling = ",".join(sampling)
    return Sample(job.key, job.smiles, numbers[order], frames[:, order], energies,
                  forces[:, order], sampling)


def _test_sample(job: Job, numbers, engine, frames, sampling) -> Sample:
    frames = frames.astype(np.float32).astype(np.float64)
    energies, forces = label(engine, frames)
    return Sample(job.key, job.smiles, numbers, frames, energies, forces, sampling)


def sample_test_nm(job: Job) -> Sample:
    """``test_nm_frames`` normal-mode samples (temperatures as in training)."""
    p = job.preset
    numbers, positions, bonds, engine, rng = _prepared(job)
    frames = normal_mode_frames(engine, positions, bonds, rng, p.test_nm_frames, p.nm_temps)
    return _test_sample(job, numbers, engine, frames, f"nm{p.nm_temps[0]:g}-{p.nm_temps[1]:g}K")


def sample_test_md(job: Job) -> Sample:
    """``test_md_frames`` Langevin frames at ``test_md_temp`` K, ``test_md_stride`` steps apart."""
    p = job.preset
    numbers, positions, _, engine, rng = _prepared(job)
    frames = langevin_frames(engine, numbers, positions, rng, p.test_md_temp, p.test_md_frames,
                             p.test_md_stride, p.md_equil)
    return _test_sample(job, numbers, engine, frames, f"md{p.test_md_temp:g}K")


def sample_dimer(job: Job) -> Sample:
    """Optimised dimer (best of ``dimer_starts`` random placements), then the S66x8 scan: the
    closest intermolecular contact scaled by each of :data:`S66_SCALES` (rigid monomers)."""
    p = job.preset
    mono_a, mono_b = (embed_smiles(s, p.seed("embed", s)) for s in job.smiles.split("."))
    numbers = np.concatenate([mono_a[0], mono_b[0]])
    rng = np.random.default_rng(job.preset.seed(job.kind, job.smiles))
    engine = XtbEngine(numbers, place_dimer(mono_a[1], mono_b[1], rng))
    best = None
    for _ in range(p.dimer_starts):
        pos = optimise(engine, numbers, place_dimer(mono_a[1], mono_b[1], rng), p.opt_steps)
        energy = engine(pos)[0]
        if best is None or energy < best[0]:
            best = (energy, pos)
    frames = _scan(best[1], len(mono_a[0]))
    return _test_sample(job, numbers, engine, frames, "s66x8 scan " + ",".join(map(str, S66_SCALES)))


def _scan(positions: np.ndarray, n_a: int) -> np.ndarray:
    """Monomer B moved rigidly along the closest A-B atom pair so that pair's distance is
    each multiple of :data:`S66_SCALES`; (8, n_atoms, 3) Å."""
    a, b = positions[:n_a], positions[n_a:]
    dist = np.linalg.norm(a[:, None] - b[None], axis=-1)
    i, j = np.unravel_index(np.argmin(dist), dist.shape)
    vec = b[j] - a[i]
    return np.array([np.vstack([a, b + (s - 1.0) * vec]) for s in S66_SCALES])


_SAMPLERS: dict[str, Callable[[Job], Sample]] = {
    "train": sample_train, "nm": sample_test_nm, "md": sample_test_md, "dimer": sample_dimer,
}


def run_job(job: Job) -> tuple[Sample, float]:
    """Compute one job (in a worker); returns (sample, wall seconds)."""
    start = time.perf_counter()
    sample = _SAMPLERS[job.kind](job)
    return sample, time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Planning and writing
# --------------------------------------------------------------------------------------------


def plan_jobs(preset: Preset, log: Callable[[str], None] = print) -> tuple[list[Job], list[Job]]:
    """Training jobs (one per distinct formula, later duplicates skipped) and test jobs.

    Raises ValueError if a test molecule also appears in the training set.
    """
    train, seen = [], set()
    for smi in preset.train_smiles:
        name = formula(smi)
        if name in seen:
            log(f"skip {smi}: formula {name} already taken")
            continue
        seen.add(name)
        train.append(Job("train", name, smi, preset))
    test = []
    for subset, smiles in preset.test_smiles.items():
        kind = "md" if subset == MD_SUBSET else "nm"
        test += [Job(kind, f"{subset}/mol{i:02d}", s, preset) for i, s in enumerate(smiles)]
    test += [Job("dimer", f"{DIMER_SUBSET}/mol{i:02d}", s, preset) for i, s in enumerate(preset.dimer_smiles)]
    overlap = {canonical(j.smiles) for j in train} & {canonical(j.smiles) for j in test}
    if overlap:
        raise ValueError(f"test molecules also in the training set: {sorted(overlap)}")
    return train, test


def root_attrs(preset: Preset) -> dict[str, str]:
    """Provenance and unit attributes written on both files' root."""
    return {
        "method": "GFN2-xTB", "program": f"tblite {tblite_version()}",
        "builder": "ekd_lightning.bundled.build", "preset": preset.name,
        "units_energy": "Hartree", "units_length": "angstrom", "units_forces": "Hartree/angstrom",
    }


def _dataset(group: h5py.Group, name: str, data: np.ndarray) -> None:
    if data.ndim == 0 or data.size < 2:
        group.create_dataset(name, data=data)
        return
    group.create_dataset(name, data=data, compression="gzip", compression_opts=4, shuffle=True)


@contextlib.contextmanager
def _atomic_h5(path: Path) -> Iterator[h5py.File]:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        yield f


def write_train(path: Path, samples: list[Sample], attrs: dict[str, str]) -> None:
    """Write the ANI-1x-layout training file atomically (:func:`~ekd_lightning.core.files.atomic_path`)."""
    with _atomic_h5(path) as f:
        f.attrs.update(attrs)
        for s in samples:
            g = f.create_group(s.key)
            g.attrs.update({"smiles": s.smiles, "sampling": s.sampling})
            _dataset(g, "atomic_numbers", s.numbers.astype(np.int64))
            _dataset(g, "coordinates", s.coordinates.astype(np.float64))
            _dataset(g, ENERGY_KEY, s.energies.astype(np.float64))
            _dataset(g, FORCE_KEY, s.forces.astype(np.float64))


def write_comp6(path: Path, samples: list[Sample], attrs: dict[str, str]) -> None:
    """Write the COMP6-layout test file atomically (:func:`~ekd_lightning.core.files.atomic_path`).

    The root gets ``attrs`` plus ``forces_convention = "-dE/dx"``: the ``forces`` datasets hold
    true forces (Hartree/Å), not the gradient the real COMP6 v1 files store under that name.
    """
    from ase.data import chemical_symbols

    with _atomic_h5(path) as f:
        f.attrs.update(attrs)
        f.attrs[COMP6_FORCES_CONVENTION[0]] = COMP6_FORCES_CONVENTION[1]
        for s in samples:
            g = f.require_group(s.key)
            g.attrs.update({"smiles": s.smiles, "sampling": s.sampling})
            symbols = [chemical_symbols[z].encode() for z in s.numbers]
            _dataset(g, "species", np.array(symbols, dtype=f"S{max(map(len, symbols))}"))
            _dataset(g, "coordinates", s.coordinates.astype(np.float32))
            _dataset(g, "energies", s.energies.astype(np.float64))
            _dataset(g, "forces", s.forces.astype(np.float32))


@contextlib.contextmanager
def _single_threaded_env() -> Iterator[None]:
    """Temporarily set OMP/BLAS thread counts to 1 so spawned workers inherit them."""
    old = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update(dict.fromkeys(_THREAD_VARS, "1"))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compute(jobs: list[Job], workers: int, log: Callable[[str], None] = print) -> list[Sample]:
    """Run jobs in ``workers`` spawned single-threaded processes; results in job order."""
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i].smiles))  # big ones first
    results: dict[int, Sample] = {}
    ctx = multiprocessing.get_context("spawn")
    with _single_threaded_env(), ctx.Pool(max(1, workers)) as pool:
        stream = pool.imap(run_job, [jobs[i] for i in order], chunksize=1)
        for i, (sample, seconds) in zip(order, stream, strict=True):
            results[i] = sample
            n_conf, n_atoms = sample.coordinates.shape[:2]
            log(f"{jobs[i].key:<16} {jobs[i].smiles:<30} {n_atoms:3d} at {n_conf:4d} conf "
                f"{seconds:6.1f} s")
    return [results[i] for i in range(len(jobs))]


def build(out_dir: str | Path, preset: str = "default", workers: int = 2,
          log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Build both files into ``out_dir``; returns (train path, test path)."""
    p = PRESETS[preset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_jobs, test_jobs = plan_jobs(p, log)
    samples = compute(train_jobs + test_jobs, workers, log)
    attrs = root_attrs(p)
    write_train(out_dir / TRAIN_NAME, samples[: len(train_jobs)], attrs)
    write_comp6(out_dir / TEST_NAME, samples[len(train_jobs):], attrs)
    return out_dir / TRAIN_NAME, out_dir / TEST_NAME


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", required=True, help="directory for the two .h5 files")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = build(args.out_dir, args.preset, args.workers,
                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    for path in paths:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    # Run the importable module's main so pickled jobs refer to ekd_lightning.bundled.build.
    from ekd_lightning.bundled.build import main as _main

    _main()
