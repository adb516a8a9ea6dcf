"""ViSNet (Wang et al., Nat. Commun. 2024), an equivariant message-passing network, from
torch-geometric, fed with the project's neighbour pairs."""

from collections.abc import Sequence
from contextlib import contextmanager

from torch import Tensor, nn
from torch_geometric.nn.models.visnet import EquivariantScalar, ViSNetBlock

from ..core.errors import DataError
from ..core.torchscript import scriptable_index_select
from .base import AtomisticModel
from .neighbors import Pairs, model_pairs, neighbor_pairs, pair_vectors

scriptable_index_select()  # after torch-geometric: metatomic stays importable


class _PairDistances(nn.Module):
    """Stands in for ViSNet's ``Distance`` (a radius graph from torch-cluster): the pairs of
    :func:`neighbor_pairs` (no self loops), or of the neighbour list :attr:`given` for the call
    in progress (periodic images), as ``(edge_index, distances, vectors)`` with
    ``vectors = pos[edge_index[0]] - pos[edge_index[1]]`` (n_pairs, 3) in Å, ViSNet's convention."""

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.given: Pairs | None = None

    def forward(self, pos: Tensor, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.given is None:
            edge_index = neighbor_pairs(pos, batch, self.cutoff)
            vectors, distances = pair_vectors(pos, edge_index.flip(0))
            return edge_index, distances, vectors.clone()  # ViSNet normalises them in place
        edge_index, shifts = model_pairs(pos, batch, self.cutoff, self.given)
        if bool((edge_index[0] == edge_index[1]).any()):  # PyG's ViSNet drops them as self loops
            raise DataError(f"ViSNet: an atom's own periodic image lies within the {self.cutoff} Å "
                            "cutoff; make the periodic cell wider than the cutoff along each axis")
        vectors, distances = pair_vectors(pos, edge_index, shifts)
        return edge_index, distances, -vectors

    @contextmanager
    def pairs(self, pairs: Pairs | None):
        """Use ``pairs`` (a given neighbour list) within the block."""
        self.given = pairs
        try:
            yield
        finally:
            self.given = None


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
        self.cutoff = float(cutoff)
        self.representation.distance = _PairDistances(cutoff)
        self.head = EquivariantScalar(hidden_channels)
        self.compiled_representation = None  # compile_for_training's; not a submodule

    def compile_for_training(self) -> bool:
        """``torch.compile`` the representation block (inductor, dynamic shapes) for training
        mode: 0.54-0.56x the eager energy-only step after 10-50 s of compiling (benchmarks/README.md,
        §6c). Evaluation mode (validation, distillation, MD) and a given neighbour list stay
        eager; the weights are shared and the state dict keeps its keys."""
        import torch

        # object.__setattr__: held outside nn.Module's registry, so no second copy of the
        # weights appears in state dicts or parameters()
        object.__setattr__(self, "compiled_representation",
                           torch.compile(self.representation, dynamic=True))
        return True

    def atomic_contributions(self, species: Tensor, pos: Tensor, batch: Tensor,
                             pairs: Pairs | None = None) -> Tensor:
        representation = self.representation
        if self.training and pairs is None and self.compiled_representation is not None:
            representation = self.compiled_representation
        with self.representation.distance.pairs(pairs):
            scalars, vectors = representation(species, pos, batch)
        return self.head.pre_reduce(scalars, vectors).squeeze(-1)
