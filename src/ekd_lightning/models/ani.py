"""ANI model (Smith et al.): AEV features and one multilayer perceptron per element.

The per-atom output of the network of an atom's element is the dimensionless contribution
that :class:`~ekd_lightning.models.base.AtomisticModel` scales and shifts to Hartree. With
``elements=("H", "C", "N", "O", "S", "F", "Cl")`` and the default AEV and layer sizes this is the
ANI-2x architecture of torchani (one ensemble member): the same 1008 features, the same layer
sizes, CELU(alpha=0.1) activations and biases, so torchani weights can be copied in.
"""

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .aev import ANIAEV
from .base import AtomisticModel
from .neighbors import Pairs

ANI2X_HIDDEN: dict[str, list[int]] = {
    "H": [256, 192, 160],
    "C": [224, 192, 160],
    "N": [192, 160, 128],
    "O": [192, 160, 128],
    "S": [160, 128, 96],
    "F": [160, 128, 96],
    "Cl": [160, 128, 96],
}
"""Hidden layer sizes of the ANI-2x atomic networks (torchani ``ANINetworks.like_2x``)."""

DEFAULT_HIDDEN: list[int] = [160, 128, 96]
"""Hidden layer sizes for an element that ANI-2x does not cover (torchani's default)."""


def atomic_network(in_dim: int, hidden: Sequence[int], activation_alpha: float = 0.1) -> nn.Sequential:
    """MLP ``in_dim -> hidden[0] -> ... -> hidden[-1] -> 1`` with CELU between linear layers.

    Weights are Kaiming-normal initialised (``a=1``, as in torchani's training examples) and
    biases are zero.
    """
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden]
    for n_in, n_out in zip(dims[:-1], dims[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), nn.CELU(alpha=activation_alpha)]
    layers.append(nn.Linear(dims[-1], 1))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, a=1.0)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def activation_backward(activation: nn.Module) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The vector-Jacobian product ``(grad, output) -> grad * f'(x)`` of an element-network
    activation module ``output = f(x)``, from its output (what the batched teacher ensemble,
    :class:`~ekd_lightning.distill.ensemble.StackedANI`, keeps), or None for an activation
    without such a rule (the ensemble then evaluates that model with autograd, and says so).

    CELU(alpha), what :func:`atomic_network` builds: f'(x) = 1 for x > 0, else
    exp(x / alpha) = output / alpha + 1: autograd's own CELU backward kernel, given the output.
    """
    if type(activation) is nn.CELU:
        return partial(_celu_backward, alpha=float(activation.alpha))
    return None


def _celu_backward(grad: Tensor, output: Tensor, alpha: float) -> Tensor:
    return torch.ops.aten.elu_backward(grad, alpha, 1.0, 1.0 / alpha, True, output)


def group_by_species(species: Tensor, num_species: int) -> tuple[Tensor, Tensor, list[int]]:
    """Atoms grouped by species, for the per-element networks without padding.

    Returns ``order`` (n_atoms,): the atoms sorted by species (stable); ``rank`` (n_atoms,):
    its inverse, the grouped row of each atom; ``sizes``: the number of atoms of each species
    (one host sync).
    """
    order = torch.argsort(species, stable=True)
    rank = torch.empty_like(order).index_copy_(
        0, order, torch.arange(order.numel(), device=order.device)
    )
    return order, rank, torch.bincount(species, minlength=num_species).tolist()


class ANIModel(AtomisticModel):
    """ANI potential: :class:`~ekd_lightning.models.aev.ANIAEV` + one MLP per element.

    Args:
        elements: element symbols; their order is the species order of the AEV blocks. The
            AEV is computed over exactly these elements (H, C, N, O: 4*16 + 10*32 = 384 features;
            H, C, N, O, S, F, Cl: the ANI-2x 1008).
        aev: keyword arguments of :class:`ANIAEV` overriding the ANI-2x constants, e.g.
            ``{"radial_cutoff": 5.2}``.
        hidden: hidden layer sizes per element symbol; elements not given use the ANI-2x sizes
            (:data:`ANI2X_HIDDEN`, or :data:`DEFAULT_HIDDEN` for other elements).
        activation_alpha: alpha of the CELU activations.
    """

    def __init__(
        self,
        elements: Sequence[str] = ("H", "C", "N", "O"),
        aev: Mapping[str, float | int] | None = None,
        hidden: Mapping[str, Sequence[int]] | None = None,
        activation_alpha: float = 0.1,
    ):
        super().__init__(elements)
        self.aev = ANIAEV(self.num_species, **dict(aev or {}))
        self.cutoff = self.aev.radial_cutoff
        hidden = dict(hidden or {})
        unknown = set(hidden) - set(self.elements)
        if unknown:
            raise ValueError(f"hidden sizes given for {sorted(unknown)}, not in {self.elements}")
        self.hidden = {
            e: list(hidden.get(e, ANI2X_HIDDEN.get(e, DEFAULT_HIDDEN))) for e in self.elements
        }
        self.networks = nn.ModuleDict(
            {
                e: atomic_network(self.aev.out_dim, self.hidden[e], activation_alpha)
                for e in self.elements
            }
        )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the network weights (AEVs are computed in it)."""
        return self.networks[self.elements[0]][0].weight.dtype

    def features(self, z: Tensor, pos: Tensor, batch: Tensor) -> Tensor:
        """The AEVs (n_atoms, aev.out_dim) of all elements, atom order, no autograd graph: for
        :meth:`energies_from_features` (e.g. kept across the epochs of energy-only training,
        where positions never change)."""
        with torch.no_grad():
            return self.aev(self.species(z), pos.to(self.dtype), batch)

    def energies_from_features(self, z: Tensor, features: Tensor, batch: Tensor,
                               num_molecules: int, prior_energies: Tensor | None = None) -> Tensor:
        """Energies (num_molecules,) Hartree, float64, from :meth:`features` of these atoms: the
        same values as ``forward`` on their positions (no forces: features are constants).
        ``prior_energies`` (num_molecules,) Hartree: the repulsion prior's energies of these
        conformations (:meth:`~.base.AtomisticModel.prior_energies`), needed when the model has
        a prior."""
        species = self.species(z)
        energies = self.sum_energies(
            species, self.atomic_contributions(species, None, batch, features=features),
            batch, num_molecules)
        if self.repulsion is None:
            return energies
        if prior_energies is None:
            raise ValueError("energies_from_features needs prior_energies: the model has a "
                             "repulsion prior")
        return energies + prior_energies

    def atomic_contributions(self, species: Tensor, pos: Tensor | None, batch: Tensor,
                             pairs: Pairs | None = None, features: Tensor | None = None) -> Tensor:
        """Dimensionless per-atom outputs (n_atoms,) in the dtype of the network weights.

        Only the AEV features of the species in the batch are computed and multiplied
        (:meth:`ANIAEV.restricted`; the others are zero): the first layers use the matching
        columns of their weights, whose other columns get zero gradients.

        Args:
            species: (n_atoms,) species index into ``elements``.
            pos: (n_atoms, 3) coordinates in Å (cast to the weights' dtype).
            batch: (n_atoms,) molecule index of each atom, sorted ascending.
            pairs: a given neighbour list with periodic shifts (None: each molecule's pairs).
            features: optional (n_atoms, aev.out_dim) AEVs from :meth:`features` (then ``pos``
                is not used).
        """
        contributions = species.new_zeros(species.shape[0], dtype=self.dtype)
        if species.numel() == 0:
            return contributions
        # grouped by species: the AEV of atom order[r] is (written to) row r
        order, rank, sizes = group_by_species(species, self.num_species)
        aev, compact, columns = self.aev.restricted(tuple(s for s, n in enumerate(sizes) if n))
        if features is not None:
            features = features.index_select(0, order)
            if columns is not None:
                features = features.index_select(1, columns)
        else:
            species_of_aev = species if compact is None else compact[species]
            features = aev(species_of_aev, pos.to(self.dtype), batch, rank, pairs)
        grouped = features.split(sizes)
        outputs = [
            network_on_columns(net, x, columns).squeeze(-1)
            for net, x, n in zip(self.networks.values(), grouped, sizes, strict=True)
            if n > 0
        ]
        return contributions.index_copy(0, order, torch.cat(outputs))


def network_on_columns(net: nn.Sequential, x: Tensor, columns: Tensor | None) -> Tensor:
    """``net(x)`` for an input that holds only the ``columns`` of the full one (the others
    being zero): the first layer uses those columns of its weight (None: all)."""
    if columns is None:
        return net(x)
    first, *rest = net
    x = F.linear(x, first.weight.index_select(1, columns), first.bias)
    for layer in rest:
        x = layer(x)
    return x
