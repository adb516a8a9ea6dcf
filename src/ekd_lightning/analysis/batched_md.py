"""Batched Langevin MD: many replicas of many molecules in one model call per step.

The MD stability test of Fu et al. ("Forces are not enough", TMLR 2023) needs many long
trajectories per model and temperature; one ASE molecule at a time in Python cannot give them.
Here every replica (molecule × temperature × replica index) lives in one flat PyG-style batch
(``z`` (n_atoms,), ``pos`` (n_atoms, 3), ``batch`` (n_atoms,) replica index), so the model
evaluates all of them in one forward/backward pass per step.

- Device: the state, the random generator and the models live on one torch device (the
  model's own, or the one asked for); nothing leaves it between failure checks (every
  ``check_every`` steps the recorded frames are copied to the host once). On the CPU the random
  stream is the one a CPU ``torch.Generator`` seeded with ``seed`` gives.
- Integrator (:func:`baoab_step`): Langevin BAOAB (Leimkuhler & Matthews), float64 positions and
  velocities, in ASE units (Å, eV, amu; time in ASE units, ``units.fs`` per fs); friction 0 is
  velocity Verlet (NVE). Each replica has its own temperature.
- Failure (:func:`run_replicas`): every ``check_every`` steps each running replica's recorded
  frames (every ``record_every`` steps) are checked by :func:`ekd_lightning.analysis.md.detect_failure`
  with :data:`~ekd_lightning.analysis.md.FU_CRITERIA` (the project's criteria plus Fu et al.'s bond-length
  deviation of 0.5 Å); a failed replica is dropped from the batch (the others run on), its time
  to failure is the step of its first failing frame × the time step, and its failure is
  classified (:func:`ekd_lightning.analysis.md.classify_failure`) with its geometry kept.
- h(r) (:func:`ekd_lightning.analysis.md.hr_counts`): the distribution of interatomic distances of a
  molecule over the intact frames of its replicas.

The table (survival, log-rank, h(r) error and failure modes against GFN2-xTB) and the cache
are shared with the ASE path: :mod:`ekd_lightning.analysis.stability`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms, units
from torch import Tensor

from ..dynamics.replicas import (
    Replicas,
    baoab_step,
    kinetic_energy,
    make_replicas,
    potential,
)
from ..inference.calculator import check_structure, torch_threads
from ..inference.members import load_members, model_device
from .md import (
    FU_CRITERIA,
    HR_BIN_A,
    HR_RANGE_A,
    StabilityCriteria,
    cached_result,
    classify_failure,
    detect_failure,
    drift_row,
    empty_result,
    hr_counts,
    hr_error,
    hr_key,
)

__all__ = ["FU_CRITERIA", "hr_counts", "hr_error"]  # re-exported: their home is ekd_lightning.md
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- running
class _Checker:
    """The failure checks of :func:`run_replicas`: each replica's frames since the last check
    against its first frame (host numpy), its h(r), its time to failure and failure geometry."""

    def __init__(self, rows, state: Replicas, energies: Tensor, criteria, record_every: int):
        self.rows, self.criteria, self.record_every = rows, criteria, record_every
        batch = state.batch.cpu().numpy()
        self.atoms_of = [np.flatnonzero(batch == r) for r in range(state.n)]
        self.numbers = state.z.cpu().numpy()
        self.first, self.first_energy = state.pos.cpu().numpy().copy(), energies.cpu().numpy().copy()
        self.hr = {hr_key(r["molecule"], r["temperature_K"]): np.zeros(round(HR_RANGE_A[1] / HR_BIN_A))
                   for r in rows}
        self.failed_step = np.full(len(rows), -1)
        self.reasons: list[str | None] = [None] * len(rows)
        self.failures: list[dict] = []

    def check(self, state: Replicas, frames: Tensor, energies: Tensor, step: int) -> Tensor:
        """Check recorded ``frames`` (F, n_atoms, 3) and ``energies`` (F, n) (host arrays) of
        the running replicas, the last recorded at ``step``; returns which to keep (n,) bool."""
        first_step = step - (len(frames) - 1) * self.record_every
        keep = torch.ones(state.n, dtype=torch.bool)
        batch = state.batch.cpu().numpy()
        for r, original in enumerate(state.ids.cpu().tolist()):
            atoms = self.atoms_of[original]
            positions = np.concatenate([self.first[atoms][None], frames[:, batch == r]])
            numbers = self.numbers[atoms]
            verdict = detect_failure(positions, np.concatenate([[self.first_energy[original]],
                                                                energies[:, r]]), numbers, self.criteria)
            intact = positions[1:] if verdict["stable"] else positions[1:verdict["frame"]]
            row = self.rows[original]
            self.hr[hr_key(row["molecule"], row["temperature_K"])] += hr_counts(intact)
            if not verdict["stable"]:
                self.failed_step[original] = first_step + (verdict["frame"] - 1) * self.record_every
                self.reasons[original] = verdict["reason"]
                row.update(classify_failure(positions[0], positions[verdict["frame"]], numbers,
                                            verdict["reason"], self.criteria))
                self.failures.append({"trajectory": original, "numbers": numbers.tolist(),
                                      "positions": positions[verdict["frame"]].tolist()})
                keep[r] = False
        return keep


def run_replicas(
    model, molecules: Sequence[Atoms], temperatures: Sequence[float], n_replicas: int,
    steps: int, timestep_fs: float = 0.5, friction_per_fs: float = 0.01,
    criteria: StabilityCriteria = FU_CRITERIA, seed: int = 0, check_every: int = 40,
    record_every: int = 4, dtype: torch.dtype = torch.float64, keep_total_energy: bool = False,
    device: str | torch.device | None = None,
) -> dict:
    """Langevin (or, with friction 0, NVE) MD of every (molecule, temperature, replica) at once.

    Args:
        model: checkpoint path, PotentialModule, energy model or a sequence (ensemble mean).
        molecules: starting geometries (each replica starts there; velocities differ).
        n_replicas: replicas per molecule and temperature.
        steps, timestep_fs, friction_per_fs: run length, time step (fs), friction (1/fs).
        criteria: failure criteria (:func:`~ekd_lightning.analysis.md.detect_failure`).
        seed: seeds the velocities and the thermostat noise of the whole batch (a generator on
            the run's device).
        check_every: steps between failure checks (``check_every`` and ``steps`` are multiples
            of ``record_every``); the only times data leave the device.
        record_every: steps between recorded frames (failure checks and h(r) use them).
        dtype: precision of the model evaluation (positions and velocities are float64).
        keep_total_energy: also return each replica's total energy at every recorded frame.
        device: where the run happens (:func:`model_device`: by default the model's device).

    Returns:
        ``trajectories``: one row per replica (``molecule``, ``n_atoms``, ``temperature_K``,
        ``replica``, ``seed``, ``steps``, ``stable``, ``reason``, ``time_to_failure_fs`` (the run
        length when stable), ``steps_run``, ``wall_s`` (the batch's wall time / replicas),
        ``failure_mode``, ``failure_bonds``); ``hr``: ``{"<molecule>@<T>": histogram counts}``
        over the intact frames of its replicas; ``failures``: the geometry of each failure
        (:func:`ekd_lightning.analysis.md.empty_result`); ``total_energy`` (with
        ``keep_total_energy``): (n_replicas, n_frames) eV, NaN after a failure.
    """
    if check_every % record_every or steps % record_every:
        raise ValueError(f"check_every {check_every} and steps {steps} must be multiples of "
                         f"record_every {record_every} (every frame is checked)")
    for atoms in molecules:  # before any work: a clear error, not a failed trajectory
        check_structure(atoms, f"starting structure {atoms.get_chemical_formula()}")
    start = time.perf_counter()
    device = model_device(model, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    members = load_members(model, dtype, device)
    state, rows = make_replicas(molecules, temperatures, n_replicas, generator)
    dt, friction = timestep_fs * units.fs, friction_per_fs / units.fs

    def force_fn(pos):
        return potential(members, state.z, pos, state.batch, state.n)

    energies, forces = force_fn(state.pos)
    checker = _Checker(rows, state, energies, criteria, record_every)
    total = torch.full((len(rows), steps // record_every + 1), math.nan, dtype=torch.float64,
                       device=device)
    total[:, 0] = energies + kinetic_energy(state)
    frames, frame_energies = [], []
    for step in range(1, steps + 1):
        energies, forces = baoab_step(state, forces, force_fn, dt, friction, generator)
        if step % record_every:
            continue
        frames.append(state.pos.clone())
        frame_energies.append(energies)
        total[state.ids, step // record_every] = energies + kinetic_energy(state)
        if step % check_every and step != steps:
            continue
        keep = checker.check(state, torch.stack(frames).cpu().numpy(),
                             torch.stack(frame_energies).cpu().numpy(), step)
        frames, frame_energies = [], []
        if not keep.all():
            keep = keep.to(device)
            forces = forces[keep[state.batch]]
            state = state.keep(keep)
        if state.n == 0:
            break
    wall = time.perf_counter() - start
    failed_step, total = checker.failed_step, total.cpu().numpy()
    for r, row in enumerate(rows):
        stable = failed_step[r] < 0
        if not stable:
            total[r, failed_step[r] // record_every:] = np.nan
        row.update({"seed": seed, "steps": steps, "stable": bool(stable), "reason": checker.reasons[r],
                    "time_to_failure_fs": (steps if stable else int(failed_step[r])) * timestep_fs,
                    "steps_run": steps if stable else int(failed_step[r]),
                    "wall_s": wall / len(rows), "failure_mode": row.pop("failure_mode", None),
                    "failure_bonds": row.pop("failure_bonds", "")})
    out = {"trajectories": rows, "hr": {k: v.tolist() for k, v in checker.hr.items()},
           "failures": sorted(checker.failures, key=lambda f: f["trajectory"])}
    if keep_total_energy:
        out["total_energy"] = total
    return out


def nve_rows(model, molecules: Sequence[Atoms], temperature_K: float, steps: int,
             timestep_fs: float = 0.5, criteria: StabilityCriteria = FU_CRITERIA, seed: int = 0,
             dtype: torch.dtype = torch.float64, device: str | torch.device | None = None) -> list[dict]:
    """Total-energy drift of one velocity-Verlet (friction 0) replica per molecule, started at
    ``temperature_K``: :func:`ekd_lightning.analysis.md.drift_row` rows (NaN drifts when a run failed)."""
    check = math.gcd(steps, 50)
    out = run_replicas(model, molecules, [temperature_K], 1, steps, timestep_fs, 0.0, criteria, seed,
                       check_every=check, record_every=1, dtype=dtype, keep_total_energy=True,
                       device=device)
    return [drift_row(row["molecule"], row["n_atoms"], row, total, timestep_fs, row["wall_s"])
            for row, total in zip(out["trajectories"], out["total_energy"], strict=True)]


# --------------------------------------------------------------------------- stability of models
def stability_runs(model, molecules: Sequence[Atoms], temperatures: Sequence[float] = (300.0,),
                   replicas: int = 4, steps: int = 1000, timestep_fs: float = 0.5,
                   friction_per_fs: float = 0.01, nve_steps: int = 0,
                   criteria: StabilityCriteria = FU_CRITERIA, seed: int = 0, record_every: int = 4,
                   dtype: str = "float32", num_threads: int | None = 1,
                   device: str | None = None) -> dict:
    """One model's batched Langevin runs (:func:`run_replicas`) and, with ``nve_steps``, its
    NVE drift at the lowest temperature (:func:`nve_rows`): a result as
    :func:`ekd_lightning.analysis.md.empty_result` (``trajectories``, ``nve``, ``hr``, ``failures``).

    ``dtype`` names the model's precision (float32 is about 1.5× faster on CPU than float64 and
    enough under a thermostat; the NVE runs always use float64); ``device`` as
    :func:`model_device`."""
    with torch_threads(num_threads):
        out = {**empty_result(), **run_replicas(
            model, molecules, temperatures, replicas, steps, timestep_fs, friction_per_fs, criteria,
            seed, check_every=10 * record_every, record_every=record_every,
            dtype=getattr(torch, dtype), device=device)}
        out["nve"] = nve_rows(model, molecules, min(temperatures), nve_steps, timestep_fs, criteria,
                              seed, device=device) if nve_steps else []
    return out


def stability_runs_cached(checkpoint: str | Path, molecules: Sequence[Atoms], **settings) -> dict:
    """:func:`stability_runs` of a checkpoint through :func:`ekd_lightning.analysis.md.cached_result`
    (``md-batched-<key>.json`` beside it; the device is not part of the key)."""
    key = {k: v for k, v in settings.items() if k != "device"}
    return cached_result(checkpoint, molecules, {**key, "criteria": settings.get("criteria", FU_CRITERIA)},
                         lambda: stability_runs(checkpoint, molecules, **settings), prefix="md-batched")


def batched_stability_table(
    models: Mapping[str, object], molecules: Sequence[Atoms],
    temperatures: Sequence[float] = (300.0, 1000.0), replicas: int = 4, steps: int = 1000,
    **table,
) -> tuple[list[dict], list[dict]]:
    """:func:`ekd_lightning.analysis.stability.stability_table` with ``engine="batched"`` (``table``:
    its other arguments): (summary rows, survival rows)."""
    from .stability import stability_table

    return stability_table(models, molecules, temperatures, engine="batched", replicas=replicas,
                           steps=steps, **table)
