"""Members of a trained potential: a checkpoint, a module or an ensemble as a list of energy
models, and their predictions (one home for "an ensemble -> its members -> their mean")."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..models.base import energy_and_forces
from ..models.neighbors import Pairs


def member_list(model) -> list:
    """A single item (checkpoint path or module) as a one-member list, a non-empty sequence as a
    list; ValueError for an empty ensemble."""
    if isinstance(model, str | Path | torch.nn.Module):
        return [model]
    members = list(model)
    if not members:
        raise ValueError("an ensemble needs at least one model (a checkpoint or a module)")
    return members


def energy_models(model) -> list[torch.nn.Module]:
    """The energy models (:class:`~ekd_lightning.models.base.AtomisticModel`) of a checkpoint
    path, a :class:`~ekd_lightning.task.module.PotentialModule`, an energy model, or a sequence
    of them (an ensemble); checkpoints are loaded (CheckpointError if unusable)."""
    from ..task.checkpoint import load_potential
    from ..task.module import PotentialModule

    members = []
    for item in member_list(model):
        module = load_potential(item) if isinstance(item, str | Path) else item
        members.append(module.model if isinstance(module, PotentialModule) else module)
    return members


def model_device(model, device: str | torch.device | None = None) -> torch.device:
    """The device MD of ``model`` runs on: ``device`` if given (``"auto"``: CUDA where visible,
    else the CPU), else the device of the model's parameters (a module or a sequence of them),
    else (a checkpoint path) the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device is not None:
        return torch.device(device)
    items = [model] if isinstance(model, torch.nn.Module) else (
        list(model) if isinstance(model, Sequence) and not isinstance(model, str) else [])
    for item in items:
        if isinstance(item, torch.nn.Module):
            for parameter in item.parameters():
                return parameter.device
    return torch.device("cpu")


def load_members(model, dtype: torch.dtype = torch.float64, device: str | torch.device | None = None
                 ) -> list[torch.nn.Module]:
    """Private copies of :func:`energy_models` in ``dtype`` on ``device`` (:func:`model_device`:
    by default the model's own), in eval mode, without parameter gradients (the caller's modules
    are left untouched)."""
    device = model_device(model, device)
    return [copy.deepcopy(m).to(device, dtype).eval().requires_grad_(False)
            for m in energy_models(model)]


def member_outputs(members: Sequence[torch.nn.Module], z: Tensor, pos: Tensor, batch: Tensor,
                   n_molecules: int, pairs: Pairs | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Each member's energies (n_molecules,) Hartree and forces (n_atoms, 3) Hartree/Å, detached,
    float64, in member order. ``z`` (n_atoms,), ``pos`` (n_atoms, 3) Å, ``batch`` (n_atoms,);
    ``pairs``: a neighbour list with periodic shifts (None: the models' own, no cell)."""
    for member in members:
        energy, forces = energy_and_forces(member, z, pos, batch, n_molecules, pairs=pairs)
        yield energy.detach().double(), forces.detach().double()


def ensemble_mean(members: Sequence[torch.nn.Module], z: Tensor, pos: Tensor, batch: Tensor,
                  n_molecules: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """The members' mean energy (n_molecules,) and forces (n_atoms, 3), float64, times ``scale``
    (Hartree and Hartree/Å for 1; ``HARTREE_TO_EV`` gives eV and eV/Å). ``pos`` is cast to the
    members' dtype."""
    x = pos.detach().to(next(members[0].parameters()).dtype)
    energy = torch.zeros(n_molecules, dtype=torch.float64, device=pos.device)
    forces = torch.zeros_like(pos, dtype=torch.float64)
    for e, f in member_outputs(members, z, x, batch, n_molecules):
        energy += e
        forces += f
    scale = scale / len(members)
    return energy * scale, forces * scale
