"""Replicas of molecules for batched MD, and the Langevin BAOAB integrator that moves them.

Every replica (molecule x temperature x replica index) lives in one flat PyG-style batch
(``z`` (n_atoms,), ``pos`` (n_atoms, 3), ``batch`` (n_atoms,) replica index), so a model evaluates
all of them in one forward/backward pass per step. Units are ASE's: Å, eV, amu; time in ASE units
(``ase.units.fs`` per fs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from ase import Atoms, units
from torch import Tensor

from ..core.units import HARTREE_TO_EV
from ..inference.members import ensemble_mean


def molecule_name(atoms: Atoms) -> str:
    """``atoms.info["name"]`` or the chemical formula."""
    return str(atoms.info.get("name") or atoms.get_chemical_formula())


def potential(members: Sequence[torch.nn.Module], z: Tensor, pos: Tensor, batch: Tensor,
              n_replicas: int) -> tuple[Tensor, Tensor]:
    """Energies (n_replicas,) eV and forces (n_atoms, 3) eV/Å, float64: the members' mean
    (:func:`~ekd_lightning.inference.members.ensemble_mean`). ``pos`` (n_atoms, 3) Å is cast to
    the members' dtype; the models return Hartree."""
    return ensemble_mean(members, z, pos, batch, n_replicas, HARTREE_TO_EV)


@dataclass
class Replicas:
    """Flat state of running replicas (float64, ASE units), all on one device.

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
    (no net momentum) at its temperature, on the generator's device.

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
    device = generator.device
    sizes = torch.tensor([len(x) for x in z])
    batch = torch.repeat_interleave(torch.arange(len(rows)), sizes).to(device)
    m = torch.cat(masses)[:, None].to(device)
    kT_t = torch.tensor(kT, dtype=torch.float64, device=device)
    vel = torch.randn(len(m), 3, dtype=torch.float64, generator=generator, device=device
                      ) * torch.sqrt(kT_t[batch, None] / m)
    momentum = torch.zeros(len(rows), 3, dtype=torch.float64, device=device).index_add(0, batch, m * vel)
    total_mass = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add(0, batch, m[:, 0])
    vel -= (momentum / total_mass[:, None])[batch]
    state = Replicas(torch.cat(z).to(device), batch, torch.arange(len(rows), device=device), m,
                     torch.cat(pos).to(device), vel, kT_t)
    return state, rows


def baoab_step(state: Replicas, forces: Tensor, force_fn, dt: float, friction: float,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One BAOAB step of all replicas in place; returns the new (energies (n,) eV, forces).

    Args:
        forces: (n_atoms, 3) eV/Å at the current positions.
        force_fn: ``pos -> (energies, forces)`` of the current replicas.
        dt: time step in ASE time units; friction: 1 / ASE time unit (0: velocity Verlet).
        generator: on the state's device.
    """
    state.vel += 0.5 * dt * forces / state.masses
    state.pos += 0.5 * dt * state.vel
    if friction > 0:
        c1 = math.exp(-friction * dt)
        sigma = torch.sqrt(state.kT[state.batch, None] / state.masses)
        noise = torch.randn(state.vel.shape, dtype=state.vel.dtype, generator=generator,
                            device=state.vel.device)
        state.vel.mul_(c1).add_(math.sqrt(1.0 - c1 * c1) * sigma * noise)
    state.pos += 0.5 * dt * state.vel
    energies, forces = force_fn(state.pos)
    state.vel += 0.5 * dt * forces / state.masses
    return energies, forces


def kinetic_energy(state: Replicas) -> Tensor:
    """Kinetic energy (n_replicas,) eV, on the state's device."""
    per_atom = 0.5 * (state.masses * state.vel**2).sum(-1)
    return torch.zeros(state.n, dtype=torch.float64, device=per_atom.device).index_add(
        0, state.batch, per_atom)
