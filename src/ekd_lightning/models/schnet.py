"""SchNet (Schütt et al.) from torch-geometric, fed with the project's neighbour pairs."""

from collections.abc import Sequence

from torch import Tensor
from torch_geometric.nn.models import SchNet

from ..core.torchscript import scriptable_index_select
from .base import AtomisticModel
from .neighbors import Pairs, model_pairs, neighbor_pairs, pair_vectors

scriptable_index_select()  # after torch-geometric: metatomic stays importable


class SchNetModel(AtomisticModel):
    """``torch_geometric.nn.models.SchNet`` as a per-atom energy model.

    The PyG module's embedding, interaction blocks and output MLP are used as they are; its
    readout is replaced by the base class's scaled per-atom sum, and its radius graph (which
    needs torch-cluster) by :func:`neighbor_pairs`.

    Args:
        elements: element symbols.
        hidden_channels, num_filters, num_interactions, num_gaussians: SchNet sizes.
        cutoff: interaction cutoff in Å (cosine envelope inside the filters).
    """

    def __init__(
        self,
        elements: Sequence[str] = ("H", "C", "N", "O"),
        hidden_channels: int = 64,
        num_filters: int = 64,
        num_interactions: int = 3,
        num_gaussians: int = 32,
        cutoff: float = 5.0,
    ):
        super().__init__(elements)
        self.cutoff = cutoff
        self.net = SchNet(
            hidden_channels=hidden_channels, num_filters=num_filters,
            num_interactions=num_interactions, num_gaussians=num_gaussians, cutoff=cutoff,
            interaction_graph=self._interaction_graph,
        )

    def _interaction_graph(self, pos: Tensor, batch: Tensor) -> tuple[Tensor, Tensor]:
        edge_index = neighbor_pairs(pos, batch, self.cutoff)
        return edge_index, pair_vectors(pos, edge_index)[1]

    def atomic_contributions(self, species: Tensor, pos: Tensor, batch: Tensor,
                             pairs: Pairs | None = None) -> Tensor:
        net = self.net
        # SchNet's embedding reserves index 0 for padding, so species are shifted by one.
        h = net.embedding(species + 1)
        if pairs is None:
            edge_index, distances = net.interaction_graph(pos, batch)
        else:  # a given neighbour list, with periodic images
            edge_index, shifts = model_pairs(pos, batch, self.cutoff, pairs)
            distances = pair_vectors(pos, edge_index, shifts)[1]
        edge_attr = net.distance_expansion(distances)
        for interaction in net.interactions:
            h = h + interaction(h, edge_index, distances, edge_attr)
        return net.lin2(net.act(net.lin1(h))).squeeze(-1)
