"""ViSNet (Wang et al., Nat. Commun. 2024), an equivariant message-passing network, from
torch-geometric, fed with the project's neighbour pairs."""

from collections.abc import Sequence

from torch import Tensor, nn
from torch_geometric.nn.models.visnet import EquivariantScalar, ViSNetBlock

from .base import AtomisticModel
from .neighbors import neighbor_pairs, pair_vectors


class _PairDistances(nn.Module):
    """Stands in for ViSNet's ``Distance`` (a radius graph from torch-cluster): the pairs of
    :func:`neighbor_pairs` (no self loops), as ``(edge_index, distances, vectors)`` with
    ``vectors = pos[edge_index[0]] - pos[edge_index[1]]`` (n_pairs, 3) in Å, ViSNet's convention."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = cutoff

    def forward(self, pos: Tensor, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        edge_index = neighbor_pairs(pos, batch, self.cutoff)
        vectors, distances = pair_vectors(pos, edge_index.flip(0))
        return edge_index, distances, vectors.clone()  # ViSNet normalises them in place


class ViSNetModel(AtomisticModel):
    """``torch_geometric.nn.models.ViSNet`` as a per-atom energy model: its representation
    block (scalar and l ≤ ``lmax`` vector features, equivariant under rotations) and its gated
    equivariant output head are used as they are; its readout is replaced by the base class's
    scaled per-atom sum, and its radius graph by :func:`neighbor_pairs`. Species indices (not
    atomic numbers) feed its embeddings.

    Args:
        elements: element symbols.
        hidden_channels, num_layers, num_heads, num_rbf, lmax: ViSNet sizes.
        cutoff: interaction cutoff in Å (cosine envelope inside the messages).
    """

    def __init__(
        self,
        elements: Sequence[str] = ("H", "C", "N", "O"),
        hidden_channels: int = 64,
        num_layers: int = 3,
        num_heads: int = 4,
        num_rbf: int = 16,
        lmax: int = 1,
        cutoff: float = 4.5,
    ):
        super().__init__(elements)
        self.representation = ViSNetBlock(
            lmax=lmax, num_heads=num_heads, num_layers=num_layers,
            hidden_channels=hidden_channels, num_rbf=num_rbf, max_z=len(self.elements),
            cutoff=cutoff,
        )
        self.representation.distance = _PairDistances(cutoff)
        self.head = EquivariantScalar(hidden_channels)

    def atomic_contributions(self, species: Tensor, pos: Tensor, batch: Tensor) -> Tensor:
        scalars, vectors = self.representation(species, pos, batch)
        return self.head.pre_reduce(scalars, vectors).squeeze(-1)
