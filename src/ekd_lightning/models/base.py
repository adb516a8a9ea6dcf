"""The contract every model follows: a batch of molecules in, one energy per molecule out.

Energies are in Hartree. Each model predicts per-atom contributions; the total is
``sum_atoms(energy_scale * contribution + self_energy[element])``, where the self atomic energies
(SAE, Hartree) are fitted by linear regression on the training split and ``energy_scale`` is the
spread of the residual energy per atom, so that networks see targets of order one; a model
may add a fixed short-range pair repulsion to it (``repulsion``, :mod:`.repulsion`). Forces are
always -dE/dx by autograd (:func:`energy_and_forces`), never a separate output.
"""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..core.errors import DataError
from ..core.units import number_to_symbol, symbol_to_number
from .neighbors import Pairs, model_pairs, pair_vectors
from .repulsion import ZBLRepulsion


class AtomisticModel(nn.Module):
    """Base class: subclasses implement :meth:`atomic_contributions`.

    Args:
        elements: element symbols the model knows, e.g. ``["H", "C", "N", "O"]``; their order
            fixes the species index used by the networks.

    Subclasses set ``cutoff`` (Å), the largest pair distance they use: a neighbour list given
    to :meth:`forward` must hold every pair within it. ``repulsion``: an optional pair
    repulsion prior added to the energy (:mod:`~ekd_lightning.models.repulsion`; set by
    :func:`~ekd_lightning.models.instantiate_model` from the config's ``repulsion`` key).
    """

    cutoff: float
    repulsion: ZBLRepulsion | None

    def __init__(self, elements: Sequence[str]):
        super().__init__()
        self.elements = list(elements)
        numbers = [symbol_to_number(s) for s in self.elements]
        index = torch.full((119,), -1, dtype=torch.long)
        index[torch.tensor(numbers)] = torch.arange(len(numbers))
        self.register_buffer("species_of_number", index, persistent=False)
        self.register_buffer("self_energies", torch.zeros(len(numbers), dtype=torch.float64))
        self.register_buffer("energy_scale", torch.ones((), dtype=torch.float64))
        self.repulsion = None

    @property
    def num_species(self) -> int:
        return len(self.elements)

    def set_energy_statistics(self, self_energies: Sequence[float], energy_scale: float) -> None:
        """Store the fitted SAE (Hartree, one per element in ``elements`` order) and scale."""
        self.self_energies.copy_(torch.as_tensor(self_energies, dtype=torch.float64))
        self.energy_scale.fill_(float(energy_scale))

    def species(self, z: Tensor) -> Tensor:
        """Species index (n_atoms,) of atomic numbers ``z``; DataError on an unknown element."""
        species = self.species_of_number[z]
        if bool((species < 0).any()):
            unknown = sorted({number_to_symbol(n) for n in z[species < 0].tolist()})
            raise DataError(
                f"element(s) {unknown} are not among this model's elements {self.elements}; "
                "filter them out of the data (data.elements) or train a model that includes them"
            )
        return species

    def atomic_contributions(self, species: Tensor, pos: Tensor, batch: Tensor,
                             pairs: Pairs | None = None) -> Tensor:
        """Dimensionless per-atom outputs (n_atoms,); scaled and shifted by :meth:`forward`."""
        raise NotImplementedError

    def compile_for_training(self) -> bool:
        """Compile (``torch.compile``) the part of the model whose training step was measured
        to get faster, used in training mode only; True if something was compiled. The base
        class compiles nothing (ViSNet compiles its representation)."""
        return False

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, num_molecules: int,
                pairs: Pairs | None = None) -> Tensor:
        """Energies (num_molecules,) in Hartree, float64.

        Args:
            z: (n_atoms,) atomic numbers.
            pos: (n_atoms, 3) coordinates in Å (float32 or float64).
            batch: (n_atoms,) molecule (or periodic system) index of each atom, sorted ascending.
            num_molecules: number of molecules in the batch.
            pairs: the neighbour list with periodic shifts (:class:`~.neighbors.Pairs`, e.g.
                :func:`~.neighbors.periodic_pairs` or an engine's); None: all pairs within
                each molecule, no periodic images.
        """
        species = self.species(z)
        energies = self.sum_energies(species, self.atomic_contributions(species, pos, batch, pairs),
                                     batch, num_molecules)
        return self.add_prior(energies, species, pos, batch, pairs)

    def add_prior(self, energies: Tensor, species: Tensor, pos: Tensor, batch: Tensor,
                  pairs: Pairs | None = None) -> Tensor:
        """``energies`` (num_molecules,) Hartree plus the repulsion prior's (if any) of the
        atoms at ``pos`` (n_atoms, 3) Å; differentiable in ``pos``."""
        if self.repulsion is None:
            return energies
        edge_index, shifts = model_pairs(pos, batch, self.repulsion.cutoff, pairs)
        vec = pair_vectors(pos, edge_index, shifts)[0]
        atomic = self.repulsion(species, edge_index[0], edge_index[1], vec)
        return energies.index_add(0, batch, atomic)

    def prior_energies(self, species: Tensor, pos: Tensor, batch: Tensor, num_molecules: int
                       ) -> Tensor:
        """The repulsion prior's energies (num_molecules,) Hartree, float64, of the molecules
        at ``pos`` (n_atoms, 3) Å (zeros without a prior): constants of a conformation, which
        energy-only training can hold (:class:`~ekd_lightning.task.module.FeatureCache`)."""
        zeros = torch.zeros(num_molecules, dtype=torch.float64, device=pos.device)
        return self.add_prior(zeros, species, pos, batch)

    def sum_energies(self, species: Tensor, contributions: Tensor, batch: Tensor,
                     num_molecules: int) -> Tensor:
        """Energies (num_molecules,) Hartree, float64, from the per-atom outputs (n_atoms,):
        ``sum_atoms(energy_scale * contribution + self_energy[species])``."""
        atomic = self.energy_scale * contributions.to(torch.float64) + self.self_energies[species]
        energies = torch.zeros(num_molecules, dtype=torch.float64, device=species.device)
        return energies.index_add(0, batch, atomic)


def energy_and_forces(
    model: nn.Module, z: Tensor, pos: Tensor, batch: Tensor, num_molecules: int,
    create_graph: bool = False, pairs: Pairs | None = None,
) -> tuple[Tensor, Tensor]:
    """Energies (num_molecules,) in Hartree and forces F = -dE/dx (n_atoms, 3) in Hartree/Å.

    ``create_graph=True`` keeps the graph so a force loss can be back-propagated; ``pairs``:
    a neighbour list with periodic shifts (see :meth:`AtomisticModel.forward`).
    """
    if not pos.requires_grad:
        pos = pos.detach().requires_grad_(True)
    with torch.enable_grad():
        energies = model(z, pos, batch, num_molecules) if pairs is None else model(
            z, pos, batch, num_molecules, pairs)
        (grad,) = torch.autograd.grad(energies.sum(), pos, create_graph=create_graph)
    return energies, -grad
