"""A trained potential, or an ensemble, as a metatomic model: one file that ASE (metatomic-ase),
torch-sim (metatomic-torchsim) and LAMMPS (``pair_style metatomic``) load.

The module follows metatomic's ``ModelInterface``: it asks the engine for one full neighbour
list (``NeighborListOptions(cutoff, full_list=True, strict=True)``, periodic images included)
and returns, in eV:

* ``energy``: the members' mean energy per system, or per atom (``per_atom``, e.g. LAMMPS's
  ``compute pe/atom``); only ``selected_atoms`` count (domain decomposition: LAMMPS's ghost
  atoms are neighbours, not counted);
* for an ensemble of two or more members, ``energy_ensemble`` (each member's energy,
  (n_systems, n_members)) and ``energy_uncertainty`` (their standard deviation, ddof=0, as the
  distilled label files store it).

Forces and stresses come from the engine by autograd through the neighbour list's vectors.
This module needs ``metatomic-torch`` (``pip install ekd-lightning[engines]``).
"""

from typing import Dict, List, Optional  # noqa: UP035 - metatomic checks these annotations

import torch
from torch import Tensor, nn

from ..core.torchscript import scriptable_index_select

scriptable_index_select()  # torch-geometric may have replaced it (see core.torchscript)

from metatensor.torch import Labels, TensorBlock, TensorMap  # noqa: E402
from metatomic.torch import (  # noqa: E402
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    NeighborListOptions,
    System,
)

from ..core.units import HARTREE_TO_EV, symbol_to_number  # noqa: E402


class MetatomicEnsemble(nn.Module):
    """metatomic's ``ModelInterface`` over exported members (``export._Exported``: ANI,
    SchNet, ViSNet), their mean energy in eV, and their spread for two or more members."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_members = len(members)
        self.hartree_to_ev = HARTREE_TO_EV
        self.options = NeighborListOptions(cutoff=max(float(m.cutoff) for m in members),
                                           full_list=True, strict=True,
                                           requestor="ekd-lightning")

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:  # noqa: UP006
        return [self.options]

    def member_energies(self, system: System) -> Tensor:
        """Per-atom energies (n_members, n_atoms) in eV, float64, of one system."""
        pairs = system.get_neighbor_list(self.options)
        i = pairs.samples.column("first_atom").to(torch.long)
        j = pairs.samples.column("second_atom").to(torch.long)
        vec = pairs.values.reshape(-1, 3)
        energies: List[Tensor] = []  # noqa: UP006
        for member in self.members:
            species = member.species(system.types.to(torch.long), system.positions)
            energies.append(member.atomic_energies(species, i, j, vec))
        return torch.stack(energies) * self.hartree_to_ev

    def forward(self, systems: List[System], outputs: Dict[str, ModelOutput],  # noqa: UP006
                selected_atoms: Optional[Labels] = None,  # noqa: UP045 - TorchScript
                ) -> Dict[str, TensorMap]:  # noqa: UP006
        per_system: List[Tensor] = []  # (n_members,) eV, selected atoms only  # noqa: UP006
        atoms: List[Tensor] = []  # (n_selected, 2) system, atom  # noqa: UP006
        per_atom: List[Tensor] = []  # (n_selected,) mean eV  # noqa: UP006
        for index, system in enumerate(systems):
            energies = self.member_energies(system)
            chosen = torch.arange(energies.shape[1], device=energies.device)
            if selected_atoms is not None:
                rows = selected_atoms.column("system") == index
                chosen = selected_atoms.column("atom")[rows].to(torch.long)
            energies = energies.index_select(1, chosen)
            per_system.append(energies.sum(1))
            per_atom.append(energies.mean(0))
            atoms.append(torch.stack([torch.full_like(chosen, index), chosen], 1))
        totals = torch.stack(per_system)  # (n_systems, n_members)
        device = totals.device
        system_labels = Labels(["system"], torch.arange(len(systems), device=device,
                                                        dtype=torch.int32).reshape(-1, 1))
        results: Dict[str, TensorMap] = {}  # noqa: UP006
        for name, request in outputs.items():
            if name not in ["energy", "energy_ensemble", "energy_uncertainty"]:
                continue
            samples, values = system_labels, totals.mean(1, keepdim=True)
            if name == "energy" and request.sample_kind == "atom":
                samples = Labels(["system", "atom"], torch.cat(atoms).to(torch.int32))
                values = torch.cat(per_atom).reshape(-1, 1)
            elif name == "energy_ensemble":
                values = totals
            elif name == "energy_uncertainty":
                values = totals.std(1, correction=0, keepdim=True)
            properties = Labels(["energy"], torch.arange(values.shape[1], device=device,
                                                         dtype=torch.int32).reshape(-1, 1))
            block = TensorBlock(values=values.to(systems[0].positions.dtype), samples=samples,
                                components=[], properties=properties)
            results[name] = TensorMap(Labels(["_"], torch.zeros(1, 1, dtype=torch.int32,
                                                                device=device)), [block])
        return results


def atomistic_model(members: list[nn.Module], name: str, description: str,
                    dtype: torch.dtype = torch.float64) -> AtomisticModel:
    """The metatomic model of exported ``members`` (one, or an ensemble), in ``dtype``
    (the positions the engine passes; weights converted), energies in eV, lengths in Å."""
    members = [m.to(dtype).eval() for m in members]
    module = MetatomicEnsemble(members).eval()
    outputs = {"energy": ModelOutput(unit="eV", sample_kind="atom")}
    if len(members) > 1:
        outputs["energy_ensemble"] = ModelOutput(unit="eV", sample_kind="system")
        outputs["energy_uncertainty"] = ModelOutput(unit="eV", sample_kind="system")
    elements = sorted(set.intersection(*(set(m.elements) for m in members)),
                      key=symbol_to_number)
    capabilities = ModelCapabilities(
        outputs=outputs, atomic_types=[symbol_to_number(e) for e in elements],
        interaction_range=max(float(m.interaction_range) for m in members),
        length_unit="angstrom", supported_devices=["cpu", "cuda"],
        dtype="float64" if dtype == torch.float64 else "float32",
    )
    metadata = ModelMetadata(name=name, description=description, authors=["ekd-lightning"])
    return AtomisticModel(module, metadata, capabilities)
