"""Molecular dynamics with trained potentials: an MD stability test.

The ASE calculator, :class:`~ekd_lightning.inference.calculator.EKDCalculator`, lives in
:mod:`ekd_lightning.inference.calculator` (imported here for the runs).

Stability test (:func:`stability_table`): for each molecule, Langevin MD (0.5 fs, friction
0.01/fs) at 300 K and 600 K with several seeds; each trajectory is checked by
:func:`detect_failure`, a pure function of the trajectory, with these criteria
(:class:`StabilityCriteria`):

- ``nonfinite``: a position, energy or force is NaN/inf (or the model raised on a geometry).
- ``collision``: two atoms closer than 0.5 Å (shorter than any bond; H2 is 0.74 Å).
- ``bond_break``: a pair bonded at the start (distance < 1.25 × sum of covalent radii) stretched
  beyond 2.0 × its reference length, the larger of its initial length and the sum of covalent
  radii (so a start from a compressed, distorted conformation does not lower the threshold):
  C–H 1.09 Å -> 2.18 Å; thermal amplitudes at 600 K are ~0.1 Å, so only a dissociation or an
  H hop reaches it.
- ``bond_deviation`` (off unless ``max_bond_deviation`` is set; the batched test of
  :mod:`ekd_lightning.analysis.batched_md` sets 0.5 Å, Fu et al., "Forces are not enough", TMLR 2023): a
  pair bonded at the start whose length differs from its initial length by more than that.
- ``energy_explosion`` / ``energy_hole``: the potential energy rose / fell by more than 1.0 eV per
  atom from its start (≈ 23 kcal/mol/atom, ~13× the mean potential energy 3/2 k_B T per atom
  that 600 K adds to a harmonic molecule; a hole is a model collapsing into an unphysical well).

A trajectory fails at its first failing frame. Per model the table reports the fraction of stable
trajectories and the mean time to failure, where stable trajectories count as their full length
(so it is a lower bound of the true mean time to failure, capped at the run length), and the NVE
energy drift of a short VelocityVerlet run per molecule: |E_tot(end) − E_tot(start)| per atom per
ps, in meV/atom/ps (also the slope of a least-squares line, less sensitive to the end points).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.constraints import FixCom
from ase.data import covalent_radii
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from ..core.errors import DataError, EKDError
from ..inference.calculator import EKDCalculator, torch_threads
from ..task.checkpoint import file_sha256
from ..train.training import write_json_atomic
from .evaluate import format_table, json_safe, parse_named, write_csv_atomic

log = logging.getLogger(__name__)

DEFAULT_MOLECULES = ("CH3OH", "CH3CH2OH", "CH3CHO", "HCOOH", "CH3CONH2")
"""ASE g2 molecules (H, C, N, O) of the default stability test."""
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


# --------------------------------------------------------------------------- MD runs
def molecule_name(atoms: Atoms) -> str:
    """``atoms.info["name"]`` or the chemical formula."""
    return str(atoms.info.get("name") or atoms.get_chemical_formula())


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

    def verdict(self, numbers, criteria) -> dict:
        return detect_failure(np.array(self.positions), np.array(self.energies), numbers, criteria,
                              np.array(self.forces))


def maxwell_boltzmann(atoms: Atoms, temperature_K: float, rng) -> None:
    """Maxwell-Boltzmann momenta drawn with ``rng`` (ASE >= 3.29 renamed the function
    ``MaxwellBoltzmannDistribution`` to ``thermalize_momenta``)."""
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):
        vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:  # pragma: no cover - older ASE
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


def _prepare(atoms: Atoms, calculator: Calculator, temperature_K: float, rng) -> Atoms:
    """A fresh copy of ``atoms`` on ``calculator``, Maxwell-Boltzmann velocities, no net
    translation or rotation."""
    atoms = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    atoms.calc = calculator
    maxwell_boltzmann(atoms, temperature_K, rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    return atoms


def _run_checked(dyn, atoms: Atoms, steps: int, check_every: int, criteria) -> tuple[dict, _Recorder]:
    """Run ``dyn`` for ``steps``, checking the trajectory every ``check_every`` steps."""
    recorder = _Recorder(atoms)
    dyn.attach(recorder, interval=1)
    verdict, done = {"stable": True, "reason": None, "frame": None}, 0
    while done < steps:
        n = min(check_every, steps - done)
        try:
            dyn.run(n)
        except (RuntimeError, ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
            log.info("MD stopped by %s: %s", type(exc).__name__, exc)
            return {"stable": False, "reason": "nonfinite", "frame": len(recorder.positions)}, recorder
        done += n
        verdict = recorder.verdict(atoms.numbers, criteria)
        if not verdict["stable"]:
            break
    return verdict, recorder


def langevin_trajectory(
    calculator: Calculator, atoms: Atoms, temperature_K: float = 300.0, seed: int = 0,
    steps: int = 400, timestep_fs: float = 0.5, friction_per_fs: float = 0.01,
    criteria: StabilityCriteria = StabilityCriteria(), check_every: int = 25,
) -> dict:
    """One Langevin trajectory checked by :func:`detect_failure`, stopped at the first failure.

    Args:
        calculator: any ASE calculator (e.g. :class:`EKDCalculator`).
        atoms: the starting geometry (not modified); velocities drawn from Maxwell-Boltzmann at
            ``temperature_K`` with ``np.random.default_rng(seed)``, which then drives Langevin.
        steps, timestep_fs, friction_per_fs: run length, time step (fs) and friction (1/fs).
        check_every: steps between checks (the run stops at most this late after a failure).

    Returns:
        A row: ``molecule``, ``n_atoms``, ``temperature_K``, ``seed``, ``steps``, ``stable``,
        ``reason``, ``time_to_failure_fs`` (run length when stable), ``steps_run``, ``wall_s``.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    md_atoms = _prepare(atoms, calculator, temperature_K, rng)
    md_atoms.set_constraint(FixCom())  # ASE >= 3.28: instead of the deprecated fixcm=True
    dyn = Langevin(md_atoms, timestep_fs * units.fs, temperature_K=temperature_K,
                   friction=friction_per_fs / units.fs, fixcm=False, rng=rng)
    verdict, recorder = _run_checked(dyn, md_atoms, steps, check_every, criteria)
    failed_frame = verdict["frame"]
    return {
        "molecule": molecule_name(atoms), "n_atoms": len(atoms), "temperature_K": temperature_K,
        "seed": seed, "steps": steps, "stable": verdict["stable"], "reason": verdict["reason"],
        "time_to_failure_fs": (steps if verdict["stable"] else failed_frame) * timestep_fs,
        "steps_run": len(recorder.positions) - 1, "wall_s": time.perf_counter() - start,
    }


def energy_drift(total, n_atoms: int, timestep_fs: float) -> tuple[float, float]:
    """NVE drift of total energies ``total`` (T,) eV, one per ``timestep_fs``, in meV/atom/ps:
    (|E(end) − E(start)| / duration, |slope of a least-squares line|)."""
    total = np.asarray(total, dtype=np.float64) * 1000.0 / n_atoms  # meV/atom
    t_ps = np.arange(len(total)) * timestep_fs / 1000.0
    return float(abs(total[-1] - total[0]) / t_ps[-1]), float(abs(np.polyfit(t_ps, total, 1)[0]))


def nve_drift(
    calculator: Calculator, atoms: Atoms, temperature_K: float = 300.0, seed: int = 0,
    steps: int = 200, timestep_fs: float = 0.5, criteria: StabilityCriteria = StabilityCriteria(),
) -> dict:
    """Total-energy drift of a VelocityVerlet (NVE) run started at ``temperature_K``.

    Returns:
        A row: ``molecule``, ``n_atoms``, ``stable`` (the :func:`detect_failure` verdict),
        ``drift_meV_atom_ps`` = |E_tot(end) − E_tot(start)| / n_atoms / duration, and
        ``drift_fit_meV_atom_ps`` = |slope of a line fitted to E_tot(t)| / n_atoms (both NaN
        when the run failed), ``wall_s``.
    """
    start = time.perf_counter()
    md_atoms = _prepare(atoms, calculator, temperature_K, np.random.default_rng(seed))
    dyn = VelocityVerlet(md_atoms, timestep_fs * units.fs)
    verdict, recorder = _run_checked(dyn, md_atoms, steps, 50, criteria)
    drift = fit = math.nan
    if verdict["stable"] and len(recorder.total) > 1:
        drift, fit = energy_drift(recorder.total, len(atoms), timestep_fs)
    return {"molecule": molecule_name(atoms), "n_atoms": len(atoms), "stable": verdict["stable"],
            "reason": verdict["reason"], "drift_meV_atom_ps": drift, "drift_fit_meV_atom_ps": fit,
            "wall_s": time.perf_counter() - start}


def as_calculator(model, num_threads: int | None = None) -> Calculator:
    """An ASE calculator: ``model`` itself if it is one, else an :class:`EKDCalculator`."""
    return model if isinstance(model, Calculator) else EKDCalculator(model, num_threads=num_threads)


def run_stability(
    model, molecules: Sequence[Atoms], temperatures: Sequence[float] = (300.0, 600.0),
    seeds: Sequence[int] = (0, 1), steps: int = 400, timestep_fs: float = 0.5,
    friction_per_fs: float = 0.01, nve_steps: int = 200,
    criteria: StabilityCriteria = StabilityCriteria(), num_threads: int | None = 1,
) -> tuple[list[dict], list[dict]]:
    """Langevin trajectories (molecule × temperature × seed) and one NVE run per molecule.

    Args:
        model: checkpoint path, PotentialModule, ensemble (sequence) or any ASE calculator.
        nve_steps: VelocityVerlet steps per molecule (0: skip NVE), started at the lowest
            temperature with the first seed.
        num_threads: torch threads during the runs (None: unchanged).

    Returns:
        (trajectory rows of :func:`langevin_trajectory`, NVE rows of :func:`nve_drift`).
    """
    calculator = as_calculator(model)
    trajectories, nve = [], []
    with torch_threads(num_threads):
        for atoms in molecules:
            for temperature in temperatures:
                for seed in seeds:
                    trajectories.append(langevin_trajectory(
                        calculator, atoms, temperature, seed, steps, timestep_fs, friction_per_fs,
                        criteria))
            if nve_steps > 0:
                nve.append(nve_drift(calculator, atoms, min(temperatures), seeds[0], nve_steps,
                                     timestep_fs, criteria))
    return trajectories, nve


def cache_path(checkpoint: str | Path, molecules: Sequence[Atoms], settings: Mapping,
               prefix: str = "md") -> Path:
    """``<prefix>-<key>.json`` beside ``checkpoint``; the key is the SHA-256 of the checkpoint's
    bytes, the molecules (symbols, positions) and the settings."""
    digest = hashlib.sha256(file_sha256(checkpoint).encode())
    for atoms in molecules:
        digest.update(str(atoms.get_chemical_symbols()).encode())
        digest.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
    digest.update(repr(sorted((k, repr(v)) for k, v in settings.items())).encode())
    return Path(checkpoint).with_name(f"{prefix}-{digest.hexdigest()[:16]}.json")


def run_stability_cached(checkpoint: str | Path, molecules: Sequence[Atoms], **settings
                         ) -> tuple[list[dict], list[dict]]:
    """:func:`run_stability` of a checkpoint file, whose rows are kept beside it
    (``md-<key>.json``, written atomically) and reused when the same checkpoint is run again with
    the same molecules and settings (e.g. the baseline and oracle shared by ablation variants).

    The key is the SHA-256 of the checkpoint's bytes, the molecules (symbols, positions) and the
    settings, so a retrained checkpoint or another setting is run afresh.
    """
    path = cache_path(checkpoint, molecules, settings)
    if path.is_file():
        saved = json.loads(path.read_text())
        return saved["trajectories"], saved["nve"]
    trajectories, nve = run_stability(checkpoint, molecules, **settings)
    write_json_atomic(json_safe({"checkpoint": str(checkpoint), "trajectories": trajectories,
                                 "nve": nve}), path)
    return trajectories, nve


def _finite_mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def summarize_stability(name: str, trajectories: Sequence[dict], nve: Sequence[dict] = ()) -> dict:
    """One summary row of a model from its trajectory and NVE rows.

    Keys: ``model``, ``n_trajectories``, ``stable_fraction``, ``stable_fraction_<T>K`` per
    temperature, ``mean_time_to_failure_fs`` (stable runs count their full length), ``failures``
    (``reason:count;...``), ``nve_drift_meV_atom_ps`` and ``nve_drift_fit_meV_atom_ps`` (means
    over molecules whose NVE run was stable), ``nve_failures``, ``wall_s``.
    """
    row = {"model": name, "n_trajectories": len(trajectories),
           "stable_fraction": _finite_mean([float(t["stable"]) for t in trajectories])}
    for temperature in sorted({t["temperature_K"] for t in trajectories}):
        runs = [float(t["stable"]) for t in trajectories if t["temperature_K"] == temperature]
        row[f"stable_fraction_{temperature:g}K"] = _finite_mean(runs)
    row["mean_time_to_failure_fs"] = _finite_mean([t["time_to_failure_fs"] for t in trajectories])
    reasons = Counter(t["reason"] for t in trajectories if not t["stable"])
    row["failures"] = ";".join(f"{r}:{c}" for r, c in sorted(reasons.items())) or "none"
    row["nve_drift_meV_atom_ps"] = _finite_mean([n["drift_meV_atom_ps"] for n in nve])
    row["nve_drift_fit_meV_atom_ps"] = _finite_mean([n["drift_fit_meV_atom_ps"] for n in nve])
    row["nve_failures"] = sum(not n["stable"] for n in nve)
    row["wall_s"] = float(sum(t["wall_s"] for t in trajectories) + sum(n["wall_s"] for n in nve))
    return row


def _run_one(task: tuple[object, Atoms], cache: bool, **settings) -> tuple[list[dict], list[dict]]:
    """:func:`run_stability` of one (model, molecule) task, or :func:`run_stability_cached` for
    a checkpoint path if ``cache``."""
    model, atoms = task
    if cache and isinstance(model, str | Path):
        return run_stability_cached(model, [atoms], **settings)
    return run_stability(model, [atoms], **settings)


def stability_table(
    models: Mapping[str, object], molecules: Sequence[Atoms] | None = None,
    temperatures: Sequence[float] = (300.0, 600.0), seeds: Sequence[int] = (0, 1),
    steps: int = 400, timestep_fs: float = 0.5, friction_per_fs: float = 0.01,
    nve_steps: int = 200, criteria: StabilityCriteria = StabilityCriteria(),
    out_dir: str | Path | None = None, num_threads: int | None = 1, map_fn=map,
    cache: bool = False,
) -> list[dict]:
    """Side-by-side MD stability of named models (see :func:`run_stability` for the arguments).

    Args:
        models: ``{name: checkpoint path | PotentialModule | ensemble | ASE calculator}``.
        molecules: starting geometries; default :func:`default_molecules`.
        out_dir: if given, write ``stability.csv`` / ``stability.json`` (summary rows, plus every
            trajectory and NVE row and the criteria in the JSON) and ``stability_runs.csv``.
        map_fn: how the (model, molecule) runs are mapped, e.g. a process pool's ``map`` to run
            them side by side (then give checkpoint paths, which cross process boundaries
            cheaply); one task per model and molecule keeps the workers evenly busy.
        cache: reuse the rows of checkpoint paths run before with the same settings
            (:func:`run_stability_cached`); other models are always run.

    Returns:
        One :func:`summarize_stability` row per model.
    """
    molecules = default_molecules() if molecules is None else list(molecules)
    rows, runs, nve_runs = [], [], []
    settings = dict(temperatures=temperatures, seeds=seeds, steps=steps, timestep_fs=timestep_fs,
                    friction_per_fs=friction_per_fs, nve_steps=nve_steps, criteria=criteria,
                    num_threads=num_threads)
    run = functools.partial(_run_one, cache=cache, **settings)
    tasks = [(model, atoms) for model in models.values() for atoms in molecules]
    results = list(map_fn(run, tasks))
    for i, name in enumerate(models):
        mine = results[i * len(molecules):(i + 1) * len(molecules)]  # molecule order, as run_stability
        trajectories = [t for rows_of_molecule, _ in mine for t in rows_of_molecule]
        nve = [n for _, nve_of_molecule in mine for n in nve_of_molecule]
        rows.append(summarize_stability(name, trajectories, nve))
        runs += [{"model": name, **t} for t in trajectories]
        nve_runs += [{"model": name, **n} for n in nve]
        log.info("%s: %s", name, rows[-1])
    if out_dir is not None:
        out_dir = Path(out_dir)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        write_csv_atomic(rows, out_dir / "stability.csv", columns)
        write_csv_atomic(runs, out_dir / "stability_runs.csv")
        write_json_atomic(json_safe({
            "criteria": asdict(criteria), "temperatures_K": list(temperatures), "seeds": list(seeds),
            "steps": steps, "timestep_fs": timestep_fs, "friction_per_fs": friction_per_fs,
            "nve_steps": nve_steps, "summary": rows, "trajectories": runs, "nve": nve_runs,
        }), out_dir / "stability.json")
    return rows


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ekd_lightning.md",
                                     description="MD stability of checkpoints (Langevin + NVE).")
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="[NAME=]CKPT")
    parser.add_argument("--molecules", nargs="*", default=list(DEFAULT_MOLECULES),
                        help="ASE g2 molecule names")
    parser.add_argument("--structures", nargs="+", default=None, metavar="FILE",
                        help="ASE-readable structure files (xyz, extxyz, sdf, ...), instead of "
                        "--molecules")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[300.0, 600.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--nve-steps", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        models = parse_named(args.checkpoints)
        molecules = ([a for f in args.structures for a in molecules_from_file(f)] if args.structures
                     else default_molecules(args.molecules))
        rows = stability_table(models, molecules, args.temperatures,
                               args.seeds, args.steps, nve_steps=args.nve_steps, out_dir=args.out)
    except (EKDError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
