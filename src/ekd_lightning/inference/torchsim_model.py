"""A trained potential, or an ensemble, as a torch-sim model (torch-sim-atomistic 0.3's
``ModelInterface``), batched over systems, periodic or not.

torch-sim >= 0.5 (Python >= 3.12) loads ``ekd-export``'s metatomic file through
metatomic-torchsim instead; this wrapper is the path for torch-sim 0.3, the newest release that
installs on Python 3.11, and runs any model ekd-lightning trains (ViSNet included), from its
checkpoint, without exporting:

>>> import torch_sim as ts
>>> model = EKDTorchSimModel("runs/student-ani2x-seed0/checkpoints/best.ckpt")
>>> final = ts.integrate([water_box, solvated], model, integrator=ts.nvt_langevin,
...                      n_steps=1000, temperature=300, timestep=0.0005)

Units are torch-sim's (metal): energies in eV, forces in eV/Å, positions in Å. Pairs with
periodic images come from vesin (:func:`~ekd_lightning.models.neighbors.periodic_pairs`) when
``state.pbc``, else each system's own pairs. Stress is not computed (no NPT).
"""

from __future__ import annotations

import torch
from torch_sim.models.interface import ModelInterface
from torch_sim.state import SimState

from ..core.units import HARTREE_TO_EV
from ..models.base import energy_and_forces
from ..models.neighbors import periodic_pairs
from .calculator import EKDCalculator


class EKDTorchSimModel(ModelInterface):
    """torch-sim's ``ModelInterface`` over ekd-lightning models.

    Args:
        model: what :class:`~ekd_lightning.EKDCalculator` takes: a checkpoint path, a
            ``PotentialModule`` or a sequence of them (an ensemble: mean energy and forces;
            ``energy_std`` (n_systems,) eV among the outputs).
        device: torch device of the computation (default: CUDA when visible, else CPU).
        dtype: precision (float64 by default: energy-conserving NVE).
    """

    def __init__(self, model, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.members = EKDCalculator(model, device=device, dtype=dtype).members
        self.cutoff = max(float(m.cutoff) for m in self.members)
        self._device, self._dtype = device, dtype
        self._compute_forces, self._compute_stress = True, False

    def forward(self, state: SimState, **kwargs) -> dict[str, torch.Tensor]:
        """Energies (n_systems,) eV and forces (n_atoms, 3) eV/Å of a batch of systems
        (``state.positions`` Å, ``state.cell`` (n_systems, 3, 3) column vectors Å)."""
        pos = state.positions.to(self._device, self._dtype)
        batch, z = state.system_idx.to(self._device), state.atomic_numbers.to(self._device)
        n = state.n_systems
        pairs = None
        if state.pbc:
            pbc = torch.ones(n, 3, dtype=torch.bool, device=self._device)
            pairs = periodic_pairs(pos, batch, state.row_vector_cell.to(pos), pbc, self.cutoff)
        energies, forces = [], []
        for member in self.members:
            e, f = energy_and_forces(member, z, pos, batch, n, pairs=pairs)
            energies.append(e.detach())
            forces.append(f.detach())
        energies = torch.stack(energies) * HARTREE_TO_EV  # (members, n_systems) eV
        out = {"energy": energies.mean(0).to(self._dtype),
               "forces": (torch.stack(forces).mean(0) * HARTREE_TO_EV).to(self._dtype)}
        if len(self.members) > 1:
            out["energy_std"] = energies.std(0, correction=0).to(self._dtype)
        return out
