"""Batched Langevin MD: many replicas of many molecules in one model call per step.

The MD stability test of Fu et al. ("Forces are not enough", TMLR 2023) needs many long
trajectories per model and temperature; one ASE molecule at a time in Python cannot give them.
Here every replica (molecule × temperature × replica index) lives in one flat PyG-style batch
(``z`` (n_atoms,), ``pos`` (n_atoms, 3), ``batch`` (n_atoms,) replica index), so the model
evaluates all of them in one forward/backward pass per step.

- Integrator (:func:`baoab_step`): Langevin BAOAB (Leimkuhler & Matthews), float64 positions and
  velocities, in ASE units (Å, eV, amu; time in ASE units, ``units.fs`` per fs); friction 0 is
  velocity Verlet (NVE). Each replica has its own temperature.
- Failure (:func:`run_replicas`): every ``check_every`` steps each running replica's recorded
  frames (every ``record_every`` steps) are checked by :func:`ekd_lightning.analysis.md.detect_failure`
  with :data:`FU_CRITERIA` (the project's criteria plus Fu et al.'s bond-length deviation of
  0.5 Å); a failed replica is dropped from the batch (the others run on) and its time to failure
  is the step of its first failing frame × the time step.
- h(r) (:func:`hr_density`, :func:`hr_error`): the distribution of interatomic distances of a
  molecule over the intact frames of its replicas, compared with GFN2-xTB Langevin MD of the
  same molecule at the same temperature (:func:`reference_hr`, tblite; cached on disk, keyed by
  molecule, temperature, steps and seed) by the L1 error ∫|h(r) − h_ref(r)| dr (0: identical,
  2: disjoint).
- Survival (:func:`survival_table`): Kaplan-Meier curves with 95% intervals per model and
  temperature and the log-rank test of each model against a reference model
  (:mod:`ekd_lightning.analysis.survival`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from ase import Atoms, units
from torch import Tensor

from ..core.units import HARTREE_TO_EV
from ..models.base import energy_and_forces
from .md import StabilityCriteria, detect_failure, energy_drift, molecule_name
from .survival import kaplan_meier, logrank, survival_at, survival_difference

log = logging.getLogger(__name__)

FU_CRITERIA = StabilityCriteria(max_bond_deviation=0.5)
"""The project's failure criteria plus Fu et al.'s: a bond more than 0.5 Å off its initial length."""
HR_RANGE_A = (0.0, 8.0)
"""Å: range of the h(r) histograms."""
HR_BIN_A = 0.02
"""Å: h(r) bin width."""


# --------------------------------------------------------------------------- model and state
def load_members(model, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu"
                 ) -> list[torch.nn.Module]:
    """Private copies of the energy models of a checkpoint path, a PotentialModule, an
    :class:`~ekd_lightning.models.base.AtomisticModel` or a sequence of them (an ensemble), in
    ``dtype`` on ``device``, in eval mode, without parameter gradients."""
    import copy

    from ..inference.calculator import _load_members

    return [copy.deepcopy(m).to(device, dtype).eval().requires_grad_(False)
            for m in _load_members(model)]


def potential(members: Sequence[torch.nn.Module], z: Tensor, pos: Tensor, batch: Tensor,
              n_replicas: int) -> tuple[Tensor, Tensor]:
    """Energies (n_replicas,) eV and forces (n_atoms, 3) eV/Å, float64: the members' mean.

    ``pos`` (n_atoms, 3) Å is cast to the members' dtype; the models return Hartree.
    """
    x = pos.detach().to(next(members[0].parameters()).dtype)
    energy = torch.zeros(n_replicas, dtype=torch.float64, device=pos.device)
    forces = torch.zeros_like(pos, dtype=torch.float64)
    for member in members:
        e, f = energy_and_forces(member, z, x, batch, n_replicas)
        energy += e.detach().double()
        forces += f.detach().double()
    scale = HARTREE_TO_EV / len(members)
    return energy * scale, forces * scale


@dataclass
class Replicas:
    """Flat state of running replicas (float64, ASE units).

    Attributes:
        z: (n_atoms,) atomic numbers.
        batch: (n_atoms,) replica index (0..n-1 over the running replicas), ascending.
        ids: (n_replicas,) index of each running replica in the original list.
        masses: (n_atoms, 1) amu.
        pos: (n_atoms, 3) Å.
        vel: (n_atoms, 3) Å per ASE time unit.
        kT: (n_replicas,) eV, the thermostat's k_B T.
    """

    z: Tensor
    batch: Tensor
    ids: Tensor
    masses: Tensor
    pos: Tensor
    vel: Tensor
    kT: Tensor

    @property
    def n(self) -> int:
        return len(self.ids)

    def keep(self, keep: Tensor) -> Replicas:
        """The replicas where ``keep`` (n_replicas,) bool is True, renumbered."""
        atoms = keep[self.batch]
        renumber = torch.cumsum(keep.long(), 0) - 1
        return Replicas(self.z[atoms], renumber[self.batch[atoms]], self.ids[keep],
                        self.masses[atoms], self.pos[atoms], self.vel[atoms], self.kT[keep])


def make_replicas(molecules: Sequence[Atoms], temperatures: Sequence[float], n_replicas: int,
                  generator: torch.Generator) -> tuple[Replicas, list[dict]]:
    """Every (molecule, temperature, replica) as one replica with Maxwell-Boltzmann velocities
    (no net momentum) at its temperature.

    Returns:
        The state and one row per replica: ``molecule``, ``n_atoms``, ``temperature_K``,
        ``replica``, in state order.
    """
    rows, z, pos, masses, kT = [], [], [], [], []
    for atoms in molecules:
        for temperature in temperatures:
            for k in range(n_replicas):
                rows.append({"molecule": molecule_name(atoms), "n_atoms": len(atoms),
                             "temperature_K": float(temperature), "replica": k})
                z.append(torch.as_tensor(atoms.numbers, dtype=torch.long))
                pos.append(torch.as_tensor(atoms.positions, dtype=torch.float64))
                masses.append(torch.as_tensor(atoms.get_masses(), dtype=torch.float64))
                kT.append(units.kB * float(temperature))
    sizes = torch.tensor([len(x) for x in z])
    batch = torch.repeat_interleave(torch.arange(len(rows)), sizes)
    m = torch.cat(masses)[:, None]
    kT_t = torch.tensor(kT, dtype=torch.float64)
    vel = torch.randn(len(m), 3, dtype=torch.float64, generator=generator) * torch.sqrt(kT_t[batch, None] / m)
    momentum = torch.zeros(len(rows), 3, dtype=torch.float64).index_add(0, batch, m * vel)
    total_mass = torch.zeros(len(rows), dtype=torch.float64).index_add(0, batch, m[:, 0])
    vel -= (momentum / total_mass[:, None])[batch]
    state = Replicas(torch.cat(z), batch, torch.arange(len(rows)), m, torch.cat(pos), vel, kT_t)
    return state, rows


def baoab_step(state: Replicas, forces: Tensor, force_fn, dt: float, friction: float,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One BAOAB step of all replicas in place; returns the new (energies (n,) eV, forces).

    Args:
        forces: (n_atoms, 3) eV/Å at the current positions.
        force_fn: ``pos -> (energies, forces)`` of the current replicas.
        dt: time step in ASE time units; friction: 1 / ASE time unit (0: velocity Verlet).
    """
    state.vel += 0.5 * dt * forces / state.masses
    state.pos += 0.5 * dt * state.vel
    if friction > 0:
        c1 = math.exp(-friction * dt)
        sigma = torch.sqrt(state.kT[state.batch, None] / state.masses)
        noise = torch.randn(state.vel.shape, dtype=state.vel.dtype, generator=generator)
        state.vel.mul_(c1).add_(math.sqrt(1.0 - c1 * c1) * sigma * noise)
    state.pos += 0.5 * dt * state.vel
    energies, forces = force_fn(state.pos)
    state.vel += 0.5 * dt * forces / state.masses
    return energies, forces


def kinetic_energy(state: Replicas) -> Tensor:
    """Kinetic energy (n_replicas,) eV."""
    per_atom = 0.5 * (state.masses * state.vel**2).sum(-1)
    return torch.zeros(state.n, dtype=torch.float64).index_add(0, state.batch, per_atom)


# --------------------------------------------------------------------------- running
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


def run_replicas(
    model, molecules: Sequence[Atoms], temperatures: Sequence[float], n_replicas: int,
    steps: int, timestep_fs: float = 0.5, friction_per_fs: float = 0.01,
    criteria: StabilityCriteria = FU_CRITERIA, seed: int = 0, check_every: int = 40,
    record_every: int = 4, dtype: torch.dtype = torch.float64, keep_total_energy: bool = False,
) -> dict:
    """Langevin (or, with friction 0, NVE) MD of every (molecule, temperature, replica) at once.

    Args:
        model: checkpoint path, PotentialModule, energy model or a sequence (ensemble mean).
        molecules: starting geometries (each replica starts there; velocities differ).
        n_replicas: replicas per molecule and temperature.
        steps, timestep_fs, friction_per_fs: run length, time step (fs), friction (1/fs).
        criteria: failure criteria (:func:`~ekd_lightning.analysis.md.detect_failure`).
        seed: seeds the velocities and the thermostat noise of the whole batch.
        check_every: steps between failure checks (``check_every`` and ``steps`` are multiples
            of ``record_every``).
        record_every: steps between recorded frames (failure checks and h(r) use them).
        dtype: precision of the model evaluation (positions and velocities are float64).
        keep_total_energy: also return each replica's total energy at every recorded frame.

    Returns:
        ``trajectories``: one row per replica (``molecule``, ``n_atoms``, ``temperature_K``,
        ``replica``, ``seed``, ``steps``, ``stable``, ``reason``, ``time_to_failure_fs`` (the run
        length when stable), ``steps_run``, ``wall_s`` (the batch's wall time / replicas));
        ``hr``: ``{"<molecule>@<T>": histogram counts}`` over the intact frames of its replicas;
        ``total_energy`` (with ``keep_total_energy``): (n_replicas, n_frames) eV, NaN after a
        failure.
    """
    if check_every % record_every or steps % record_every:
        raise ValueError(f"check_every {check_every} and steps {steps} must be multiples of "
                         f"record_every {record_every} (every frame is checked)")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    members = load_members(model, dtype)
    state, rows = make_replicas(molecules, temperatures, n_replicas, generator)
    dt, friction = timestep_fs * units.fs, friction_per_fs / units.fs

    def force_fn(pos):
        return potential(members, state.z, pos, state.batch, state.n)

    energies, forces = force_fn(state.pos)
    atoms_of = [torch.nonzero(state.batch == r).flatten().numpy() for r in range(state.n)]
    first = state.pos.numpy().copy()
    first_energy = energies.numpy().copy()
    hr = {f"{r['molecule']}@{r['temperature_K']:g}": np.zeros(round(HR_RANGE_A[1] / HR_BIN_A))
          for r in rows}
    n_frames = steps // record_every + 1
    total = np.full((len(rows), n_frames), np.nan)
    total[:, 0] = (energies + kinetic_energy(state)).numpy()
    failed_step = np.full(len(rows), -1)
    reasons: list[str | None] = [None] * len(rows)
    frames, frame_energies = [], []
    for step in range(1, steps + 1):
        energies, forces = baoab_step(state, forces, force_fn, dt, friction, generator)
        if step % record_every:
            continue
        frames.append(state.pos.numpy().copy())
        frame_energies.append(energies.numpy().copy())
        total[state.ids.numpy(), step // record_every] = (energies + kinetic_energy(state)).numpy()
        if step % check_every and step != steps:
            continue
        stack, e_stack = np.stack(frames), np.stack(frame_energies)  # (F, n_atoms, 3), (F, n)
        first_step = step - (len(frames) - 1) * record_every
        keep = torch.ones(state.n, dtype=torch.bool)
        for r, original in enumerate(state.ids.tolist()):
            atoms = atoms_of[original]
            positions = np.concatenate([first[atoms][None], stack[:, state.batch.numpy() == r]])
            verdict = detect_failure(positions, np.concatenate([[first_energy[original]], e_stack[:, r]]),
                                     state.z[state.batch == r].numpy(), criteria)
            intact = positions[1:] if verdict["stable"] else positions[1:verdict["frame"]]
            row = rows[original]
            hr[f"{row['molecule']}@{row['temperature_K']:g}"] += hr_counts(intact)
            if not verdict["stable"]:
                failed_step[original] = first_step + (verdict["frame"] - 1) * record_every
                reasons[original] = verdict["reason"]
                total[original, failed_step[original] // record_every:] = np.nan
                keep[r] = False
        frames, frame_energies = [], []
        if not keep.all():
            forces = forces[keep[state.batch]]
            state = state.keep(keep)
        if state.n == 0:
            break
    wall = time.perf_counter() - start
    for r, row in enumerate(rows):
        stable = failed_step[r] < 0
        row.update({"seed": seed, "steps": steps, "stable": bool(stable), "reason": reasons[r],
                    "time_to_failure_fs": (steps if stable else int(failed_step[r])) * timestep_fs,
                    "steps_run": steps if stable else int(failed_step[r]),
                    "wall_s": wall / len(rows)})
    out = {"trajectories": rows, "hr": {k: v.tolist() for k, v in hr.items()}}
    if keep_total_energy:
        out["total_energy"] = total
    return out


def nve_rows(model, molecules: Sequence[Atoms], temperature_K: float, steps: int,
             timestep_fs: float = 0.5, criteria: StabilityCriteria = FU_CRITERIA, seed: int = 0,
             dtype: torch.dtype = torch.float64) -> list[dict]:
    """Total-energy drift of one velocity-Verlet (friction 0) replica per molecule, started at
    ``temperature_K``: rows as :func:`ekd_lightning.analysis.md.nve_drift` (``drift_meV_atom_ps``,
    ``drift_fit_meV_atom_ps``; NaN when the run failed)."""
    check = math.gcd(steps, 50)
    out = run_replicas(model, molecules, [temperature_K], 1, steps, timestep_fs, 0.0, criteria, seed,
                       check_every=check, record_every=1, dtype=dtype, keep_total_energy=True)
    rows = []
    for row, total in zip(out["trajectories"], out["total_energy"], strict=True):
        drift = fit = math.nan
        if row["stable"]:
            drift, fit = energy_drift(total, row["n_atoms"], timestep_fs)
        rows.append({"molecule": row["molecule"], "n_atoms": row["n_atoms"], "stable": row["stable"],
                     "reason": row["reason"], "drift_meV_atom_ps": drift,
                     "drift_fit_meV_atom_ps": fit, "wall_s": row["wall_s"]})
    return rows


# --------------------------------------------------------------------------- GFN2-xTB reference
def reference_frames(atoms: Atoms, temperature_K: float, steps: int, seed: int = 0,
                     timestep_fs: float = 0.5, friction_per_fs: float = 0.01, record_every: int = 4,
                     cache_dir: str | Path | None = None) -> np.ndarray:
    """Frames (n_frames, n_atoms, 3) Å of GFN2-xTB Langevin MD (tblite's ASE calculator, ASE's
    Langevin) of ``atoms`` at ``temperature_K``, one every ``record_every`` steps after the start.

    Cached in ``cache_dir`` (``xtb-<key>.npz``, written atomically) under a key of the molecule
    (symbols, positions), temperature, steps, seed, time step, friction, record interval and
    the tblite version, so it is computed once and never reused for other settings.
    """
    from importlib.metadata import version

    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from tblite.ase import TBLite

    from .evaluate import _write_atomic
    from .md import _prepare

    settings = (temperature_K, steps, seed, timestep_fs, friction_per_fs, record_every, version("tblite"))
    digest = hashlib.sha256(str(atoms.get_chemical_symbols()).encode())
    digest.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
    digest.update(repr(settings).encode())
    path = Path(cache_dir) / f"xtb-{digest.hexdigest()[:16]}.npz" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path)["positions"]
    rng = np.random.default_rng(seed)
    md_atoms = _prepare(atoms, TBLite(method="GFN2-xTB", verbosity=0), temperature_K, rng)
    md_atoms.set_constraint(FixCom())
    dyn = Langevin(md_atoms, timestep_fs * units.fs, temperature_K=temperature_K,
                   friction=friction_per_fs / units.fs, fixcm=False, rng=rng)
    frames = []
    dyn.attach(lambda: frames.append(md_atoms.get_positions()), interval=record_every)
    dyn.run(steps)
    positions = np.array(frames[1:])  # frame 0 is the start
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, positions=positions)
        _write_atomic(path, lambda handle: handle.write(buffer.getvalue()))
    return positions


def reference_hr(molecules: Sequence[Atoms], temperatures: Sequence[float], steps: int,
                 cache_dir: str | Path | None = None, **settings) -> dict[str, np.ndarray]:
    """``{"<molecule>@<T>": h(r) histogram counts}`` of :func:`reference_frames` runs."""
    return {f"{molecule_name(atoms)}@{float(t):g}":
            hr_counts(reference_frames(atoms, t, steps, cache_dir=cache_dir, **settings))
            for atoms in molecules for t in temperatures}


# --------------------------------------------------------------------------- stability of models
def stability_runs(model, molecules: Sequence[Atoms], temperatures: Sequence[float] = (300.0,),
                   replicas: int = 4, steps: int = 1000, timestep_fs: float = 0.5,
                   friction_per_fs: float = 0.01, nve_steps: int = 0,
                   criteria: StabilityCriteria = FU_CRITERIA, seed: int = 0, record_every: int = 4,
                   dtype: str = "float32", num_threads: int | None = 1) -> dict:
    """One model's batched Langevin runs (:func:`run_replicas`) and, with ``nve_steps``, its
    NVE drift at the lowest temperature (:func:`nve_rows`): ``{"trajectories", "nve", "hr"}``.

    ``dtype`` names the model's precision (float32 is about 1.5× faster on CPU than float64 and
    enough under a thermostat; the NVE runs always use float64)."""
    from ..inference.calculator import torch_threads

    with torch_threads(num_threads):
        out = run_replicas(model, molecules, temperatures, replicas, steps, timestep_fs,
                           friction_per_fs, criteria, seed, check_every=10 * record_every,
                           record_every=record_every, dtype=getattr(torch, dtype))
        out["nve"] = nve_rows(model, molecules, min(temperatures), nve_steps, timestep_fs, criteria,
                              seed) if nve_steps else []
    return out


def stability_runs_cached(checkpoint: str | Path, molecules: Sequence[Atoms], **settings) -> dict:
    """:func:`stability_runs` of a checkpoint, kept beside it (``md-batched-<key>.json``, see
    :func:`ekd_lightning.analysis.md.cache_path`) and reused for the same checkpoint, molecules and settings."""
    import json

    from ..train.training import write_json_atomic
    from .evaluate import json_safe
    from .md import cache_path

    path = cache_path(checkpoint, molecules, {**settings, "criteria": settings.get("criteria", FU_CRITERIA)},
                      prefix="md-batched")
    if path.is_file():
        return json.loads(path.read_text())
    saved = json_safe({"checkpoint": str(checkpoint), **stability_runs(checkpoint, molecules, **settings)})
    write_json_atomic(saved, path)
    return saved


def _run_task(task: tuple, cache: bool, **settings) -> dict:
    """:func:`stability_runs` (or the cached one for a checkpoint path) of a (model, molecules,
    temperature, nve_steps) task."""
    model, molecules, temperature, nve_steps = task
    settings = {**settings, "temperatures": [temperature], "nve_steps": nve_steps}
    if cache and isinstance(model, str | Path):
        return stability_runs_cached(model, molecules, **settings)
    return stability_runs(model, molecules, **settings)


def survival_table(runs: Sequence[Mapping], reference: str | None = None) -> list[dict]:
    """Kaplan-Meier survival per model and temperature, and each model against ``reference``.

    Args:
        runs: trajectory rows with ``model``, ``temperature_K``, ``stable``,
            ``time_to_failure_fs`` and ``steps`` × ``timestep_fs`` implied by the stable rows.
        reference: the model the others are compared with (e.g. the baseline); None: none.

    Returns:
        One row per model and temperature (and ``all``, pooled): ``model``, ``temperature``,
        ``n``, ``failures``, ``survival`` (KM at the end of the runs), ``survival_low`` /
        ``survival_high`` (95%), ``mean_time_fs`` (restricted mean time to failure, the area under
        the curve), and, against ``reference``: ``difference`` (S − S_ref at the end) with its
        95% interval ``difference_low`` / ``difference_high`` and the log-rank ``p_logrank``
        (stratified by temperature for ``all``).
    """
    models = list(dict.fromkeys(r["model"] for r in runs))
    temperatures = sorted({float(r["temperature_K"]) for r in runs})

    def select(model, temperature):
        mine = [r for r in runs if r["model"] == model
                and (temperature == "all" or float(r["temperature_K"]) == temperature)]
        return (np.array([r["time_to_failure_fs"] for r in mine], dtype=float),
                np.array([not r["stable"] for r in mine]),
                np.array([float(r["temperature_K"]) for r in mine]))

    rows = []
    for model in models:
        for temperature in [*temperatures, "all"]:
            times, events, strata = select(model, temperature)
            if not len(times):
                continue
            end = float(times.max())
            curve = kaplan_meier(times, events)
            s, low, high, _ = survival_at(curve, end)
            grid = np.append(curve["time"], end)
            area = float(np.sum(np.diff(grid) * curve["survival"]))
            row = {"model": model, "temperature": temperature if temperature == "all" else f"{temperature:g}K",
                   "n": len(times), "failures": int(events.sum()), "survival": s,
                   "survival_low": low, "survival_high": high, "mean_time_fs": area}
            if reference is not None and model != reference:
                ref_times, ref_events, ref_strata = select(reference, temperature)
                if len(ref_times):
                    diff = survival_difference(curve, kaplan_meier(ref_times, ref_events), end)
                    test = logrank(times, events, ref_times, ref_events, strata, ref_strata)
                    row.update({"difference": diff[0], "difference_low": diff[1],
                                "difference_high": diff[2], "p_logrank": test["p"]})
            rows.append(row)
    return rows


def plot_survival(runs: Sequence[Mapping], path: str | Path) -> None:
    """Kaplan-Meier curves with 95% bands, one panel per temperature, one colour per model (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import ROLE_COLOURS, role_of, save_figure

    temperatures = sorted({float(r["temperature_K"]) for r in runs})
    models = list(dict.fromkeys(r["model"] for r in runs))
    fig, axes = plt.subplots(1, len(temperatures), figsize=(4.5 * len(temperatures), 3.6),
                             squeeze=False, sharey=True)
    for ax, temperature in zip(axes[0], temperatures, strict=True):
        for k, model in enumerate(models):
            mine = [r for r in runs if r["model"] == model and float(r["temperature_K"]) == temperature]
            times = np.array([r["time_to_failure_fs"] for r in mine]) / 1000.0
            curve = kaplan_meier(times, [not r["stable"] for r in mine])
            t = np.append(curve["time"], times.max())
            role = role_of(model)  # pipeline names get their role colour, others the cycle
            colour = ROLE_COLOURS[role] if role != "other" else f"C{k}"
            ax.step(t, np.append(curve["survival"], curve["survival"][-1]), where="post",
                    color=colour, label=f"{model} (n={len(mine)})")
            ax.fill_between(t, np.append(curve["lower"], curve["lower"][-1]),
                            np.append(curve["upper"], curve["upper"][-1]), step="post",
                            color=colour, alpha=0.2)
        ax.set(title=f"{temperature:g} K", xlabel="time (ps)", ylim=(0, 1.02))
    axes[0][0].set_ylabel("fraction intact (Kaplan-Meier, 95% CI)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, Path(path))
    plt.close(fig)


def batched_stability_table(
    models: Mapping[str, object], molecules: Sequence[Atoms],
    temperatures: Sequence[float] = (300.0, 1000.0), replicas: int = 4, steps: int = 1000,
    nve_steps: int = 0, reference: str | None = None, reference_steps: int = 0,
    reference_cache: str | Path | None = None, out_dir: str | Path | None = None, map_fn=map,
    cache: bool = False, **settings,
) -> tuple[list[dict], list[dict]]:
    """Batched MD stability of named models side by side, with survival analysis and h(r).

    Args:
        models: ``{name: checkpoint path | PotentialModule | ensemble}``.
        molecules, temperatures, replicas, steps: each model runs ``replicas`` trajectories per
            molecule and temperature of ``steps`` steps (see :func:`stability_runs` for
            ``settings``: timestep_fs, friction_per_fs, criteria, seed, record_every, dtype).
        nve_steps: NVE drift run per molecule at the lowest temperature (0: none).
        reference: the model the others are compared with in the survival table.
        reference_steps: GFN2-xTB MD steps per molecule and temperature for the h(r) error
            (0: no h(r) error), cached in ``reference_cache``.
        out_dir: if given, ``stability.csv`` / ``stability.json`` (summary, every trajectory,
            NVE and survival row, h(r) histograms), ``stability_runs.csv``, ``survival.csv``,
            ``survival.png``.
        map_fn: maps the (model, temperature) tasks, e.g. a process pool's ``map``.
        cache: reuse the runs of checkpoint paths run before with the same settings.

    Returns:
        (one :func:`ekd_lightning.analysis.md.summarize_stability` row per model, with ``survival_<T>K``
        (KM at the end, "S [low, high]"), ``p_logrank`` against ``reference`` and
        ``hr_error_<T>K`` (mean over molecules) added; the :func:`survival_table` rows).
    """
    import functools

    from ..train.training import write_json_atomic
    from .evaluate import json_safe, write_csv_atomic
    from .md import summarize_stability

    molecules, temperatures = list(molecules), [float(t) for t in temperatures]
    tasks = [(model, molecules, t, nve_steps if t == min(temperatures) else 0)
             for model in models.values() for t in temperatures]
    run = functools.partial(_run_task, cache=cache, replicas=replicas, steps=steps, **settings)
    results = list(map_fn(run, tasks))
    same = {k: settings[k] for k in ("timestep_fs", "friction_per_fs", "record_every", "seed")
            if k in settings}
    ref_hr = (reference_hr(molecules, temperatures, reference_steps, reference_cache, **same)
              if reference_steps else {})
    rows, runs, nve_runs, hr = [], [], [], {}
    for i, name in enumerate(models):
        mine = results[i * len(temperatures):(i + 1) * len(temperatures)]
        trajectories = [t for result in mine for t in result["trajectories"]]
        nve = [n for result in mine for n in result["nve"]]
        runs += [{"model": name, **t} for t in trajectories]
        nve_runs += [{"model": name, **n} for n in nve]
        hr[name] = {k: v for result in mine for k, v in result["hr"].items()}
        rows.append(summarize_stability(name, trajectories, nve))
    survival = survival_table(runs, reference if reference in models else None)
    for row in rows:
        for s in survival:
            if s["model"] == row["model"] and s["temperature"] != "all":
                row[f"survival_{s['temperature']}"] = (f"{s['survival']:.2f} [{s['survival_low']:.2f}, "
                                                       f"{s['survival_high']:.2f}]")
            if s["model"] == row["model"] and s["temperature"] == "all" and "p_logrank" in s:
                row["p_logrank"] = s["p_logrank"]
        for t in temperatures if ref_hr else ():
            errors = [hr_error(hr[row["model"]][f"{molecule_name(a)}@{t:g}"],
                               ref_hr[f"{molecule_name(a)}@{t:g}"]) for a in molecules]
            row[f"hr_error_{t:g}K"] = float(np.nanmean(errors)) if np.isfinite(errors).any() else math.nan
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_csv_atomic(rows, out_dir / "stability.csv", list(dict.fromkeys(k for r in rows for k in r)))
        write_csv_atomic(runs, out_dir / "stability_runs.csv")
        write_csv_atomic(survival, out_dir / "survival.csv",
                         list(dict.fromkeys(k for r in survival for k in r)))
        plot_survival(runs, out_dir / "survival.png")
        write_json_atomic(json_safe({
            "settings": {"temperatures_K": temperatures, "replicas": replicas, "steps": steps,
                         "nve_steps": nve_steps, "reference_steps": reference_steps,
                         **{k: asdict(v) if isinstance(v, StabilityCriteria) else v
                            for k, v in settings.items()}},
            "summary": rows, "survival": survival, "trajectories": runs, "nve": nve_runs,
            "hr": hr, "hr_reference": {k: v.tolist() for k, v in ref_hr.items()},
        }), out_dir / "stability.json")
    return rows, survival
