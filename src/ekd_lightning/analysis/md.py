"""Molecular dynamics with trained potentials: an MD stability test.

The ASE calculator, :class:`~ekd_lightning.inference.calculator.EKDCalculator`, lives in
:mod:`ekd_lightning.inference.calculator` (imported here for the runs).

Stability test (:func:`stability_table`): for each molecule, Langevin MD (0.5 fs, friction
0.01/fs) at 300 K and 1000 K (:data:`DEFAULT_TEMPERATURES`, as the pipeline's MD step) with
several seeds; each trajectory is checked by :func:`detect_failure`, a pure function of the
trajectory, with these criteria (:class:`StabilityCriteria`; :data:`FU_CRITERIA` is the
project's default for ``ekd-md``, the pipeline and the MD benchmark alike):

- ``nonfinite``: a position, energy or force is NaN/inf (or the model raised on a geometry).
- ``collision``: two atoms closer than 0.5 Å (shorter than any bond; H2 is 0.74 Å).
- ``bond_break``: a pair bonded at the start (distance < 1.25 × sum of covalent radii) stretched
  beyond 2.0 × its reference length, the larger of its initial length and the sum of covalent
  radii (so a start from a compressed, distorted conformation does not lower the threshold):
  C–H 1.09 Å -> 2.18 Å; thermal amplitudes at 600 K are ~0.1 Å, so only a dissociation or an
  H hop reaches it.
- ``bond_deviation`` (off unless ``max_bond_deviation`` is set; :data:`FU_CRITERIA` sets 0.5 Å,
  Fu et al., "Forces are not enough", TMLR 2023): a pair bonded at the start whose length
  differs from its initial length by more than that.
- ``energy_explosion`` / ``energy_hole``: the potential energy rose / fell by more than 1.0 eV per
  atom from its start (≈ 23 kcal/mol/atom, ~13× the mean potential energy 3/2 k_B T per atom
  that 600 K adds to a harmonic molecule; a hole is a model collapsing into an unphysical well).

A trajectory fails at its first failing frame. Per model the table reports the fraction of stable
trajectories and the mean time to failure, where stable trajectories count as their full length
(so it is a lower bound of the true mean time to failure, capped at the run length), and the NVE
energy drift of a short VelocityVerlet run per molecule: |E_tot(end) − E_tot(start)| per atom per
ps, in meV/atom/ps (also the slope of a least-squares line, less sensitive to the end points).

A failed trajectory is also described at its failure frame (:func:`classify_failure`): which
bonds failed and how (stretch, compression, hydrogen transfer). The table itself, its cache and
the GFN2-xTB reference it is judged against are shared by this ASE path and the batched one
(:mod:`ekd_lightning.analysis.stability`, :mod:`ekd_lightning.analysis.md_reference`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.constraints import FixCom
from ase.data import chemical_symbols, covalent_radii
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from ..core.errors import DataError, EKDError
from ..core.files import json_safe, write_json_atomic
from ..core.hashing import file_sha256
from ..dynamics.replicas import molecule_name
from ..inference.calculator import EKDCalculator, check_structure, torch_threads
from .evaluate import format_table, parse_named

log = logging.getLogger(__name__)

DEFAULT_MOLECULES = ("CH3OH", "CH3CH2OH", "CH3CHO", "CH3CONH2")
"""ASE g2 molecules (H, C, N, O) of the default stability test (``ekd-md``, the pipeline's MD
step and the MD benchmark)."""
DEFAULT_TEMPERATURES = (300.0, 1000.0)
"""K: the default stability test's temperatures, room temperature and a hot, stressing one."""
FAILURE_REASONS = ("nonfinite", "collision", "bond_break", "bond_deviation", "energy_explosion",
                   "energy_hole")
"""Failure reasons, in the order they are checked within one frame."""


# --------------------------------------------------------------------------- failure detection
@dataclass(frozen=True)
class StabilityCriteria:
    """Thresholds of :func:`detect_failure` (see the module docstring for the reasoning).

    Attributes:
        bond_scale: a pair is bonded at the start if closer than this × the sum of covalent radii.
        bond_break_factor: a bond breaks beyond this × max(initial length, sum of covalent radii).
        min_distance: Å; any pair closer collides.
        max_bond_deviation: Å; a bonded pair fails when |length − initial length| exceeds it
            (inf: off).
        max_energy_rise, max_energy_drop: eV per atom of potential energy change from frame 0.
    """

    bond_scale: float = 1.25
    bond_break_factor: float = 2.0
    min_distance: float = 0.5
    max_bond_deviation: float = math.inf
    max_energy_rise: float = 1.0
    max_energy_drop: float = 1.0


FU_CRITERIA = StabilityCriteria(max_bond_deviation=0.5)
"""The project's failure criteria plus Fu et al.'s: a bond more than 0.5 Å off its initial
length. The default of ``ekd-md``, the pipeline's MD step and the MD benchmark."""
HR_RANGE_A = (0.0, 8.0)
"""Å: range of the h(r) histograms (the distribution of a molecule's interatomic distances)."""
HR_BIN_A = 0.02
"""Å: h(r) bin width."""
FAILURE_MODES = ("stretch", "compression", "hydrogen_transfer")
"""How a bond fails (:func:`classify_failure`); other failures keep their reason as mode."""


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def failure_masks(positions, energies, numbers, criteria: StabilityCriteria = StabilityCriteria(),
                  forces=None) -> dict[str, np.ndarray]:
    """Per-frame failure flags ``{reason: (T,) bool}`` of a trajectory (see :func:`detect_failure`)."""
    positions = np.asarray(positions, dtype=np.float64)
    energies = np.asarray(energies, dtype=np.float64)
    numbers = np.asarray(numbers)
    n_frames, n_atoms = positions.shape[:2]
    if energies.shape != (n_frames,) or positions.shape[2:] != (3,) or len(numbers) != n_atoms:
        raise ValueError(f"positions {positions.shape}, energies {energies.shape} and "
                         f"{len(numbers)} atomic numbers do not describe one trajectory")
    nonfinite = ~np.isfinite(positions).all(axis=(1, 2)) | ~np.isfinite(energies)
    if forces is not None:
        nonfinite |= ~np.isfinite(np.asarray(forces)).all(axis=(1, 2))
    i, j = np.triu_indices(n_atoms, k=1)
    with np.errstate(invalid="ignore"):
        dist = np.linalg.norm(positions[:, i] - positions[:, j], axis=-1)  # (T, n_pairs)
        collision = (dist < criteria.min_distance).any(axis=1)
        radii = covalent_radii[numbers[i]] + covalent_radii[numbers[j]]
        bonded = dist[0] < criteria.bond_scale * radii
        reference = np.maximum(dist[0, bonded], radii[bonded])  # a compressed start counts as r_cov
        bond_break = (dist[:, bonded] > criteria.bond_break_factor * reference).any(axis=1)
        deviation = np.abs(dist[:, bonded] - dist[0, bonded]) > criteria.max_bond_deviation
        change = (energies - energies[0]) / n_atoms
        rise, drop = change > criteria.max_energy_rise, change < -criteria.max_energy_drop
    return {"nonfinite": nonfinite, "collision": collision, "bond_break": bond_break,
            "bond_deviation": deviation.any(axis=1), "energy_explosion": rise, "energy_hole": drop}


def detect_failure(positions, energies, numbers, criteria: StabilityCriteria = StabilityCriteria(),
                   forces=None) -> dict:
    """First failure of a trajectory; a pure function of its frames.

    Args:
        positions: (T, n_atoms, 3) Å, frame 0 is the reference (bonds, energy).
        energies: (T,) potential energies, eV.
        numbers: (n_atoms,) atomic numbers.
        criteria: thresholds.
        forces: optional (T, n_atoms, 3), only checked for being finite.

    Returns:
        ``stable`` (bool), ``reason`` (one of :data:`FAILURE_REASONS` or None) and ``frame`` (the
        first failing frame index or None); within one frame the reasons are checked in the
        order of :data:`FAILURE_REASONS`.
    """
    masks = failure_masks(positions, energies, numbers, criteria, forces)
    found = [(frame, k, reason) for k, reason in enumerate(FAILURE_REASONS)
             if (frame := _first(masks[reason])) is not None]
    if not found:
        return {"stable": True, "reason": None, "frame": None}
    frame, _, reason = min(found)
    return {"stable": False, "reason": reason, "frame": frame}


def bonded_pairs(positions, numbers, bond_scale: float = 1.25) -> np.ndarray:
    """(n_bonds, 2) index pairs i < j closer than ``bond_scale`` × the sum of their covalent
    radii in ``positions`` (n_atoms, 3) Å."""
    numbers = np.asarray(numbers)
    i, j = np.triu_indices(len(numbers), k=1)
    dist = np.linalg.norm(np.asarray(positions)[i] - np.asarray(positions)[j], axis=-1)
    bonded = dist < bond_scale * (covalent_radii[numbers[i]] + covalent_radii[numbers[j]])
    return np.stack([i[bonded], j[bonded]], axis=1)


def classify_failure(start, failed, numbers, reason: str | None,
                     criteria: StabilityCriteria = FU_CRITERIA) -> dict:
    """Which bonds failed and how, at a trajectory's failure frame.

    Args:
        start, failed: (n_atoms, 3) Å, the first frame and the failure frame.
        numbers: (n_atoms,) atomic numbers.
        reason: the :func:`detect_failure` reason (None: intact, nothing to classify).
        criteria: a bond of ``start`` (``bond_scale``) fails when its length changed by more
            than ``max_bond_deviation`` (0.5 Å where that is inf) or beyond ``bond_break_factor``.

    Returns:
        ``failure_mode``: ``hydrogen_transfer`` (an H bonded to X at the start is bonded to
        another heavy atom and not to X), else ``stretch`` / ``compression`` (the bond whose
        length changed most, longer / shorter), else ``reason`` (e.g. ``energy_explosion``);
        ``failure_bonds``: ``"C0-H4:stretch;O1-H5:hydrogen_transfer>C0"`` (``""`` when none).
    """
    if reason is None:
        return {"failure_mode": None, "failure_bonds": ""}
    start, failed, numbers = np.asarray(start), np.asarray(failed), np.asarray(numbers)
    symbols = [chemical_symbols[z] + str(k) for k, z in enumerate(numbers)]
    before = bonded_pairs(start, numbers, criteria.bond_scale)
    after = {tuple(p) for p in bonded_pairs(failed, numbers, criteria.bond_scale).tolist()}
    limit = criteria.max_bond_deviation if math.isfinite(criteria.max_bond_deviation) else 0.5
    labels, worst, transfers = [], (0.0, None), []
    for a, b in before.tolist():
        change = np.linalg.norm(failed[a] - failed[b]) - np.linalg.norm(start[a] - start[b])
        h, x = (a, b) if numbers[a] == 1 else (b, a)
        if numbers[h] == 1 and numbers[x] != 1 and (a, b) not in after:
            new = [y for y in range(len(numbers)) if y != x and numbers[y] != 1
                   and (min(h, y), max(h, y)) in after]
            if new:
                transfers.append(f"{symbols[x]}-{symbols[h]}:hydrogen_transfer>{symbols[new[0]]}")
                continue
        if abs(change) > limit:
            kind = "stretch" if change > 0 else "compression"
            labels.append(f"{symbols[a]}-{symbols[b]}:{kind}")
            if abs(change) > worst[0]:
                worst = (abs(change), kind)
    mode = "hydrogen_transfer" if transfers else worst[1] or reason
    return {"failure_mode": mode, "failure_bonds": ";".join(transfers + labels)}


# --------------------------------------------------------------------------- h(r)
def pair_distances(positions: np.ndarray) -> np.ndarray:
    """All interatomic distances (..., n_pairs) Å of frames (..., n_atoms, 3)."""
    i, j = np.triu_indices(positions.shape[-2], k=1)
    return np.linalg.norm(positions[..., i, :] - positions[..., j, :], axis=-1)


def hr_counts(positions: np.ndarray) -> np.ndarray:
    """Histogram (n_bins,) of the interatomic distances of frames (T, n_atoms, 3) over
    :data:`HR_RANGE_A` in :data:`HR_BIN_A` bins (distances beyond the range are dropped)."""
    bins = round((HR_RANGE_A[1] - HR_RANGE_A[0]) / HR_BIN_A)
    return np.histogram(pair_distances(positions), bins=bins, range=HR_RANGE_A)[0].astype(np.float64)


def hr_density(counts) -> np.ndarray:
    """h(r) (n_bins,) 1/Å: histogram counts normalised to unit integral."""
    counts = np.asarray(counts, dtype=np.float64)
    return counts / max(counts.sum(), 1.0) / HR_BIN_A


def hr_error(counts, reference_counts) -> float:
    """∫|h(r) − h_ref(r)| dr of two histograms (dimensionless, 0..2; NaN if one is empty)."""
    if not np.sum(counts) or not np.sum(reference_counts):
        return math.nan
    return float(np.abs(hr_density(counts) - hr_density(reference_counts)).sum() * HR_BIN_A)


def hr_key(molecule: str, temperature_K: float) -> str:
    """``"<molecule>@<T>"``: the key of a molecule's h(r) at a temperature."""
    return f"{molecule}@{float(temperature_K):g}"


# --------------------------------------------------------------------------- MD runs
def default_molecules(names: Sequence[str] = DEFAULT_MOLECULES) -> list[Atoms]:
    """ASE g2 molecules by name, with ``info["name"]`` set."""
    from ase.build import molecule

    out = []
    for name in names:
        atoms = molecule(name)
        atoms.info["name"] = name
        out.append(atoms)
    return out


def molecules_from_file(path: str | Path) -> list[Atoms]:
    """Every structure of an ASE-readable file (xyz, extxyz, sdf, ...; ``info["name"]`` = the
    file's stem, plus ``-<index>`` when it holds several); DataError when it cannot be read."""
    from ase.io import read

    try:
        images = read(path, index=":")
    except Exception as exc:  # ASE raises many types for unreadable or unknown files
        raise DataError(f"{path}: cannot read structures ({type(exc).__name__}: {exc}); give a "
                        "file ASE reads (xyz, extxyz, sdf, ...)") from exc
    if not images:
        raise DataError(f"{path}: holds no structure; give a file with at least one molecule")
    for k, atoms in enumerate(images):
        atoms.info["name"] = Path(path).stem + (f"-{k}" if len(images) > 1 else "")
    return images


def molecules_from_records(records, max_molecules: int | None = None, conformation: int = 0) -> list[Atoms]:
    """One geometry per :class:`~ekd_lightning.data.MoleculeRecord` (``info["name"]`` = its key)."""
    out = []
    for record in list(records)[:max_molecules]:
        atoms = Atoms(numbers=record.atomic_numbers, positions=record.coordinates[conformation])
        atoms.info["name"] = record.key
        out.append(atoms)
    return out


class _Recorder:
    """Frames of a running MD: positions Å, potential energy eV, forces eV/Å, total energy eV."""

    def __init__(self, atoms: Atoms):
        self.atoms, self.positions, self.energies, self.forces, self.total = atoms, [], [], [], []

    def __call__(self):
        epot = self.atoms.get_potential_energy()
        self.positions.append(self.atoms.get_positions())
        self.energies.append(epot)
        self.forces.append(self.atoms.get_forces())
        self.total.append(epot + self.atoms.get_kinetic_energy())

    def verdict(self, numbers, criteria, since: int = 1) -> dict:
        """:func:`detect_failure` of frame 0 and the frames from ``since`` on (frame indices of
        the whole recording)."""
        pick = [0, *range(max(since, 1), len(self.positions))]
        verdict = detect_failure(np.array([self.positions[k] for k in pick]),
                                 np.array([self.energies[k] for k in pick]), numbers, criteria,
                                 np.array([self.forces[k] for k in pick]))
        if verdict["frame"]:
            verdict["frame"] = pick[verdict["frame"]]
        return verdict


def maxwell_boltzmann(atoms: Atoms, temperature_K: float, rng) -> None:
    """Maxwell-Boltzmann momenta drawn with ``rng`` (ASE >= 3.29 renamed the function
    ``MaxwellBoltzmannDistribution`` to ``thermalize_momenta``)."""
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):
        vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:  # pragma: no cover - older ASE
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


def prepare_md(atoms: Atoms, calculator: Calculator, temperature_K: float, rng) -> Atoms:
    """A fresh copy of ``atoms`` on ``calculator``, Maxwell-Boltzmann velocities drawn with
    ``rng`` (a numpy Generator), no net translation or rotation."""
    check_structure(atoms, f"starting structure {atoms.get_chemical_formula()}")
    atoms = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    atoms.calc = calculator
    maxwell_boltzmann(atoms, temperature_K, rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    return atoms


def _run_checked(dyn, atoms: Atoms, steps: int, check_every: int, criteria,
                 record_every: int = 1) -> tuple[dict, _Recorder]:
    """Run ``dyn`` for ``steps``, recording every ``record_every`` steps and checking the
    recorded frames every ``check_every`` steps."""
    recorder = _Recorder(atoms)
    dyn.attach(recorder, interval=record_every)
    verdict, done, checked = {"stable": True, "reason": None, "frame": None}, 0, 1
    while done < steps:
        n = min(check_every, steps - done)
        try:
            dyn.run(n)
        except (RuntimeError, ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            log.info("MD stopped by %s: %s", type(exc).__name__, exc)
            return {"stable": False, "reason": "nonfinite", "frame": len(recorder.positions)}, recorder
        done += n
        verdict = recorder.verdict(atoms.numbers, criteria, checked)
        checked = len(recorder.positions)
        if not verdict["stable"]:
            break
    return verdict, recorder


def langevin_run(
    calculator: Calculator, atoms: Atoms, temperature_K: float = 300.0, seed: int = 0,
    steps: int = 400, timestep_fs: float = 0.5, friction_per_fs: float = 0.01,
    criteria: StabilityCriteria = StabilityCriteria(), check_every: int = 25, record_every: int = 1,
) -> dict:
    """One Langevin trajectory checked by :func:`detect_failure`, stopped at the first failure.

    Args:
        calculator: any ASE calculator (e.g. :class:`EKDCalculator`, tblite's ``TBLite``).
        atoms: the starting geometry (not modified); velocities drawn from Maxwell-Boltzmann at
            ``temperature_K`` with ``np.random.default_rng(seed)``, which then drives Langevin.
        steps, timestep_fs, friction_per_fs: run length, time step (fs) and friction (1/fs).
        check_every: steps between checks (the run stops at most this late after a failure); a
            multiple of ``record_every``.
        record_every: steps between recorded (and checked) frames.

    Returns:
        ``row``: ``molecule``, ``n_atoms``, ``temperature_K``, ``seed``, ``steps``, ``stable``,
        ``reason``, ``time_to_failure_fs`` (run length when stable), ``steps_run``, ``wall_s``,
        ``failure_mode``, ``failure_bonds`` (:func:`classify_failure`); ``intact`` (F, n_atoms,
        3) Å: the recorded frames after the start and before any failure; ``failed``: the
        (n_atoms, 3) Å geometry of the failure frame, or None.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    md_atoms = prepare_md(atoms, calculator, temperature_K, rng)
    md_atoms.set_constraint(FixCom())  # ASE >= 3.28: instead of the deprecated fixcm=True
    dyn = Langevin(md_atoms, timestep_fs * units.fs, temperature_K=temperature_K,
                   friction=friction_per_fs / units.fs, fixcm=False, rng=rng)
    verdict, recorder = _run_checked(dyn, md_atoms, steps, check_every, criteria, record_every)
    frames, frame = np.array(recorder.positions), verdict["frame"]
    failed = None if verdict["stable"] else frames[min(frame, len(frames) - 1)]
    row = {
        "molecule": molecule_name(atoms), "n_atoms": len(atoms), "temperature_K": temperature_K,
        "seed": seed, "steps": steps, "stable": verdict["stable"], "reason": verdict["reason"],
        "time_to_failure_fs": (steps if verdict["stable"] else frame * record_every) * timestep_fs,
        "steps_run": (len(recorder.positions) - 1) * record_every,
        "wall_s": time.perf_counter() - start,
        **classify_failure(frames[0], failed, atoms.numbers, verdict["reason"], criteria),
    }
    return {"row": row, "intact": frames[1:] if verdict["stable"] else frames[1:frame], "failed": failed}


def langevin_trajectory(calculator: Calculator, atoms: Atoms, *args, **kwargs) -> dict:
    """The row of :func:`langevin_run` (same arguments)."""
    return langevin_run(calculator, atoms, *args, **kwargs)["row"]


def energy_drift(total, n_atoms: int, timestep_fs: float) -> tuple[float, float]:
    """NVE drift of total energies ``total`` (T,) eV, one per ``timestep_fs``, in meV/atom/ps:
    (|E(end) − E(start)| / duration, |slope of a least-squares line|)."""
    total = np.asarray(total, dtype=np.float64) * 1000.0 / n_atoms  # meV/atom
    t_ps = np.arange(len(total)) * timestep_fs / 1000.0
    return float(abs(total[-1] - total[0]) / t_ps[-1]), float(abs(np.polyfit(t_ps, total, 1)[0]))


def drift_row(molecule: str, n_atoms: int, verdict: Mapping, total, timestep_fs: float,
              wall_s: float) -> dict:
    """The NVE row of a run (both MD paths): ``molecule``, ``n_atoms``, ``stable``, ``reason``,
    ``drift_meV_atom_ps`` and ``drift_fit_meV_atom_ps`` (:func:`energy_drift` of the total
    energies ``total`` (T,) eV, one per ``timestep_fs``; NaN when the run failed), ``wall_s``."""
    drift = fit = math.nan
    if verdict["stable"] and len(total) > 1:
        drift, fit = energy_drift(total, n_atoms, timestep_fs)
    return {"molecule": molecule, "n_atoms": n_atoms, "stable": verdict["stable"],
            "reason": verdict["reason"], "drift_meV_atom_ps": drift, "drift_fit_meV_atom_ps": fit,
            "wall_s": wall_s}


def nve_drift(
    calculator: Calculator, atoms: Atoms, temperature_K: float = 300.0, seed: int = 0,
    steps: int = 200, timestep_fs: float = 0.5, criteria: StabilityCriteria = StabilityCriteria(),
) -> dict:
    """Total-energy drift of a VelocityVerlet (NVE) run started at ``temperature_K``.

    Returns:
        A :func:`drift_row`: ``drift_meV_atom_ps`` = |E_tot(end) − E_tot(start)| / n_atoms /
        duration and ``drift_fit_meV_atom_ps`` = |slope of a line fitted to E_tot(t)| / n_atoms.
    """
    start = time.perf_counter()
    md_atoms = prepare_md(atoms, calculator, temperature_K, np.random.default_rng(seed))
    dyn = VelocityVerlet(md_atoms, timestep_fs * units.fs)
    verdict, recorder = _run_checked(dyn, md_atoms, steps, 50, criteria)
    return drift_row(molecule_name(atoms), len(atoms), verdict, recorder.total, timestep_fs,
                     time.perf_counter() - start)


def as_calculator(model, num_threads: int | None = None) -> Calculator:
    """An ASE calculator: ``model`` itself if it is one, else an :class:`EKDCalculator`."""
    return model if isinstance(model, Calculator) else EKDCalculator(model, num_threads=num_threads)


def empty_result() -> dict:
    """The result of MD runs, as both MD paths return it: ``trajectories`` (rows),
    ``nve`` (rows), ``hr`` (``{hr_key: histogram counts}``) and ``failures`` (one
    ``{"trajectory": row index, "numbers", "positions" (n_atoms, 3) Å}`` per failed trajectory)."""
    return {"trajectories": [], "nve": [], "hr": {}, "failures": []}


def add_run(result: dict, run: Mapping, numbers) -> None:
    """Add one :func:`langevin_run` to a result (:func:`empty_result`): its row, its intact
    frames to the h(r) of its molecule and temperature, its failure geometry."""
    row = run["row"]
    key = hr_key(row["molecule"], row["temperature_K"])
    counts = hr_counts(np.asarray(run["intact"]).reshape(-1, row["n_atoms"], 3))
    result["hr"][key] = (np.asarray(result["hr"].get(key, 0.0)) + counts).tolist()
    result["trajectories"].append(row)
    if run["failed"] is not None:
        result["failures"].append({"trajectory": len(result["trajectories"]) - 1,
                                   "numbers": np.asarray(numbers).tolist(),
                                   "positions": np.asarray(run["failed"]).tolist()})


def run_stability(
    model, molecules: Sequence[Atoms], temperatures: Sequence[float] = (300.0, 600.0),
    seeds: Sequence[int] = (0, 1), steps: int = 400, timestep_fs: float = 0.5,
    friction_per_fs: float = 0.01, nve_steps: int = 200,
    criteria: StabilityCriteria = StabilityCriteria(), num_threads: int | None = 1,
    record_every: int = 1, details: bool = False,
) -> tuple[list[dict], list[dict]] | dict:
    """Langevin trajectories (molecule × temperature × seed) and one NVE run per molecule.

    Args:
        model: checkpoint path, PotentialModule, ensemble (sequence) or any ASE calculator.
        nve_steps: VelocityVerlet steps per molecule (0: skip NVE), started at the lowest
            temperature with the first seed.
        num_threads: torch threads during the runs (None: unchanged).
        record_every: steps between recorded and checked frames.
        details: return the whole result (:func:`empty_result`: rows, h(r), failure geometries).

    Returns:
        (trajectory rows of :func:`langevin_trajectory`, NVE rows of :func:`nve_drift`), or the
        result with ``details``.
    """
    calculator = as_calculator(model)
    result = empty_result()
    with torch_threads(num_threads):
        for atoms in molecules:
            for temperature in temperatures:
                for seed in seeds:
                    add_run(result, langevin_run(
                        calculator, atoms, temperature, seed, steps, timestep_fs, friction_per_fs,
                        criteria, max(25 // record_every, 1) * record_every, record_every),
                        atoms.numbers)
            if nve_steps > 0:
                result["nve"].append(nve_drift(calculator, atoms, min(temperatures), seeds[0],
                                               nve_steps, timestep_fs, criteria))
    return result if details else (result["trajectories"], result["nve"])


def _finite_mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def summarize_stability(name: str, trajectories: Sequence[dict], nve: Sequence[dict] = ()) -> dict:
    """One summary row of a model from its trajectory and NVE rows.

    Keys: ``model``, ``n_trajectories``, ``stable_fraction``, ``stable_fraction_<T>K`` per
    temperature, ``mean_time_to_failure_fs`` (stable runs count their full length), ``failures``
    (``reason:count;...``), ``failure_modes`` (``mode:count;...``, :func:`classify_failure`),
    ``nve_drift_meV_atom_ps`` and ``nve_drift_fit_meV_atom_ps`` (means over molecules whose NVE
    run was stable), ``nve_failures``, ``wall_s``.
    """
    row = {"model": name, "n_trajectories": len(trajectories),
           "stable_fraction": _finite_mean([float(t["stable"]) for t in trajectories])}
    for temperature in sorted({t["temperature_K"] for t in trajectories}):
        runs = [float(t["stable"]) for t in trajectories if t["temperature_K"] == temperature]
        row[f"stable_fraction_{temperature:g}K"] = _finite_mean(runs)
    row["mean_time_to_failure_fs"] = _finite_mean([t["time_to_failure_fs"] for t in trajectories])
    reasons = Counter(t["reason"] for t in trajectories if not t["stable"])
    row["failures"] = ";".join(f"{r}:{c}" for r, c in sorted(reasons.items())) or "none"
    modes = Counter(t.get("failure_mode") or t["reason"] for t in trajectories if not t["stable"])
    row["failure_modes"] = ";".join(f"{m}:{c}" for m, c in sorted(modes.items())) or "none"
    row["nve_drift_meV_atom_ps"] = _finite_mean([n["drift_meV_atom_ps"] for n in nve])
    row["nve_drift_fit_meV_atom_ps"] = _finite_mean([n["drift_fit_meV_atom_ps"] for n in nve])
    row["nve_failures"] = sum(not n["stable"] for n in nve)
    row["wall_s"] = float(sum(t["wall_s"] for t in trajectories) + sum(n["wall_s"] for n in nve))
    return row


# --------------------------------------------------------------------------- result cache
def run_key(identity: str, molecules: Sequence[Atoms], settings: Mapping) -> str:
    """16 hex digits of the SHA-256 of ``identity`` (what computes: a checkpoint's SHA-256, a
    reference method and version), the molecules (symbols, positions) and the settings: the key
    of every MD result cached on disk."""
    digest = hashlib.sha256(identity.encode())
    for atoms in molecules:
        digest.update(str(atoms.get_chemical_symbols()).encode())
        digest.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
    digest.update(repr(sorted((k, repr(v)) for k, v in settings.items())).encode())
    return digest.hexdigest()[:16]


def cache_path(checkpoint: str | Path, molecules: Sequence[Atoms], settings: Mapping,
               prefix: str = "md") -> Path:
    """``<prefix>-<key>.json`` beside ``checkpoint``; the key (:func:`run_key`) is of the
    checkpoint's bytes, the molecules (symbols, positions) and the settings."""
    return Path(checkpoint).with_name(f"{prefix}-{run_key(file_sha256(checkpoint), molecules, settings)}.json")


def cached_result(checkpoint: str | Path, molecules: Sequence[Atoms], settings: Mapping, run,
                  prefix: str = "md") -> dict:
    """``run()`` (a result dict of MD runs of ``checkpoint``) kept beside the checkpoint
    (:func:`cache_path`, written atomically, JSON-safe) and read back when the same checkpoint is
    run again with the same molecules and settings (e.g. a baseline shared by ablation
    variants); a retrained checkpoint or another setting is run afresh. Both MD paths use it."""
    path = cache_path(checkpoint, molecules, settings, prefix)
    if path.is_file():
        return json.loads(path.read_text())
    saved = json_safe({"checkpoint": str(checkpoint), **run()})
    write_json_atomic(saved, path)
    return saved


def run_stability_cached(checkpoint: str | Path, molecules: Sequence[Atoms], **settings
                         ) -> tuple[list[dict], list[dict]]:
    """:func:`run_stability` of a checkpoint file through :func:`cached_result`
    (``md-<key>.json``): (trajectory rows, NVE rows)."""
    saved = cached_result(checkpoint, molecules, settings,
                          lambda: run_stability(checkpoint, molecules, details=True, **settings))
    return saved["trajectories"], saved["nve"]


def stability_table(
    models: Mapping[str, object], molecules: Sequence[Atoms] | None = None,
    temperatures: Sequence[float] = (300.0, 600.0), seeds: Sequence[int] = (0, 1),
    steps: int = 400, timestep_fs: float = 0.5, friction_per_fs: float = 0.01,
    nve_steps: int = 200, criteria: StabilityCriteria = StabilityCriteria(),
    out_dir: str | Path | None = None, num_threads: int | None = 1, map_fn=map,
    cache: bool = False, **reference,
) -> list[dict]:
    """Side-by-side MD stability of named models, one ASE trajectory at a time: the summary
    rows of :func:`ekd_lightning.analysis.stability.stability_table` with ``engine="ase"`` (any ASE
    calculator runs here; ``reference``: its reference arguments).

    This library function keeps its former defaults (300/600 K, without the 0.5 Å bond
    deviation: ASE's EMT, which the tests run, stretches O-H beyond it at once); ``ekd-md``,
    the pipeline and the MD benchmark all run :data:`FU_CRITERIA` at
    :data:`DEFAULT_TEMPERATURES`."""
    from .stability import stability_table as table

    return table(models, molecules, temperatures, engine="ase", seeds=seeds, steps=steps,
                 timestep_fs=timestep_fs, friction_per_fs=friction_per_fs, nve_steps=nve_steps,
                 criteria=criteria, out_dir=out_dir, num_threads=num_threads, map_fn=map_fn,
                 cache=cache, **reference)[0]


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ekd-md", description="MD stability of checkpoints (Langevin + NVE), on the "
        "project's default criteria (FU_CRITERIA) and temperatures, as the pipeline's MD step.")
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="[NAME=]CKPT")
    parser.add_argument("--molecules", nargs="*", default=list(DEFAULT_MOLECULES),
                        help="ASE g2 molecule names")
    parser.add_argument("--structures", nargs="+", default=None, metavar="FILE",
                        help="ASE-readable structure files (xyz, extxyz, sdf, ...), instead of "
                        "--molecules")
    parser.add_argument("--temperatures", nargs="+", type=float, default=list(DEFAULT_TEMPERATURES))
    parser.add_argument("--engine", choices=["ase", "batched"], default="ase",
                        help="ase: one trajectory at a time (--seeds); batched: every replica in "
                        "one model call per step (--replicas, on the model's device)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--replicas", type=int, default=8, help="per molecule and temperature "
                        "(--engine batched)")
    parser.add_argument("--device", default="auto", help="--engine batched: torch device of the "
                        "models (default: cuda where visible, else cpu)")
    parser.add_argument("--steps", type=int, default=1000, help="0.5 fs each")
    parser.add_argument("--nve-steps", type=int, default=200)
    parser.add_argument("--reference-replicas", type=int, default=0, help="GFN2-xTB trajectories "
                        "per molecule and temperature under the same test (0: none)")
    parser.add_argument("--reference-cache", default="runs/md-reference")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .stability import stability_table as table

    try:
        models = parse_named(args.checkpoints)
        molecules = ([a for f in args.structures for a in molecules_from_file(f)] if args.structures
                     else default_molecules(args.molecules))
        engine = ({"engine": "ase", "seeds": args.seeds} if args.engine == "ase" else
                  {"engine": "batched", "replicas": args.replicas, "device": args.device})
        rows, _ = table(models, molecules, args.temperatures, steps=args.steps,
                        nve_steps=args.nve_steps, reference_replicas=args.reference_replicas,
                        reference_cache=args.reference_cache, out_dir=args.out, **engine)
    except (EKDError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
