"""MACE (Batatia et al., NeurIPS 2022), the higher-body-order equivariant network, from
mace-torch (the ``mace`` extra), fed with the project's neighbour pairs."""

import contextlib
import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..core.units import symbol_to_number
from .base import AtomisticModel
from .neighbors import Pairs, model_pairs, pair_vectors

_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def import_mace():
    """``mace.modules``, leaving ``torch.load``'s safe default as it was: mace-torch sets
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process on import (its e3nn 0.4.4 loads
    its constants with the pre-2.6 default), which would make every later ``torch.load``
    unpickle arbitrary objects; it is set for the import only. (Its print that cuequivariance,
    a CUDA accelerator, is absent is not passed on.)"""
    before = os.environ.get(_NO_WEIGHTS_ONLY)
    os.environ[_NO_WEIGHTS_ONLY] = "1"
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from mace import modules
    finally:
        if before is None:
            os.environ.pop(_NO_WEIGHTS_ONLY, None)
        else:
            os.environ[_NO_WEIGHTS_ONLY] = before
    return modules


class MACEBody(nn.Module):
    """MACE's embedding, interactions, products and readouts, from a full neighbour list: the
    sum of the readouts' per-atom energies (n_atoms,) (mace's ``node_energy`` with zero E0s).
    Scriptable after :func:`e3nn.util.jit.compile` (the export port's), so the model and its
    export share this one forward.

    ``forward(species, i, j, vec)``: species (n_atoms,) indices, directed pairs (i, j) in both
    directions with ``vec`` = r_j - r_i (+ shift) (n_pairs, 3) Å, mace's sender i, receiver j.
    """

    def __init__(self, mace: nn.Module, num_species: int):
        super().__init__()
        self.num_species = num_species
        self.node_embedding = mace.node_embedding
        self.spherical_harmonics = mace.spherical_harmonics
        self.radial_embedding = mace.radial_embedding
        self.interactions = mace.interactions
        self.products = mace.products
        self.readouts = mace.readouts
        self.register_buffer("atomic_numbers", mace.atomic_numbers.clone())
        self.register_buffer("r_max", mace.r_max.clone())  # Å, in the weights' dtype

    def forward(self, species: Tensor, i: Tensor, j: Tensor, vec: Tensor) -> Tensor:
        vec = vec.to(self.r_max.dtype)
        edge_index = torch.stack([i, j])
        attrs = nn.functional.one_hot(species, self.num_species).to(vec.dtype)
        feats = self.node_embedding(attrs)
        edge_attrs = self.spherical_harmonics(vec)
        edge_feats, cutoff = self.radial_embedding(vec.norm(2, -1, True), attrs,
                                                   edge_index, self.atomic_numbers)
        heads = torch.zeros_like(species)
        energies = vec.new_zeros(species.shape[0])
        layer = 0
        for interaction, product, readout in zip(self.interactions, self.products, self.readouts,
                                                     strict=True):
            feats, skip = interaction(node_attrs=attrs, node_feats=feats, edge_attrs=edge_attrs,
                                      edge_feats=edge_feats, edge_index=edge_index, cutoff=cutoff,
                                      first_layer=layer == 0, lammps_class=None,
                                      lammps_natoms=(0, 0))
            feats = product(node_feats=feats, sc=skip, node_attrs=attrs)
            energies = energies + readout(feats, heads)[:, 0]
            layer += 1
        return energies


class MACEModel(AtomisticModel):
    """mace-torch's ``MACE`` as a per-atom energy model: its blocks are used as they are
    (:class:`MACEBody`); its E0s and readout sum are replaced by the base class's scaled
    per-atom sum, its graph by the project's pairs (:func:`model_pairs`, periodic images
    included). Species indices feed its one-hot node attributes.

    Args:
        elements: element symbols.
        r_max: cutoff in Å (polynomial envelope of order ``num_polynomial_cutoff``).
        num_bessel: radial Bessel functions.
        max_ell: highest spherical harmonic of the edges.
        num_interactions: message-passing layers.
        hidden_irreps, mlp_irreps: e3nn irreps of the node features and the last readout's
            hidden layer, e.g. ``"16x0e+16x1o"``, ``"16x0e"``.
        correlation: body order of the products minus one.
        avg_num_neighbors: normalisation of the messages (neighbours within ``r_max``).
    """

    def __init__(
        self,
        elements: Sequence[str] = ("H", "C", "N", "O"),
        r_max: float = 4.5,
        num_bessel: int = 8,
        num_polynomial_cutoff: int = 5,
        max_ell: int = 2,
        num_interactions: int = 2,
        hidden_irreps: str = "16x0e+16x1o",
        mlp_irreps: str = "16x0e",
        correlation: int = 2,
        avg_num_neighbors: float = 10.0,
    ):
        super().__init__(elements)
        modules = import_mace()
        from e3nn import o3

        mace = modules.MACE(
            r_max=r_max, num_bessel=num_bessel, num_polynomial_cutoff=num_polynomial_cutoff,
            max_ell=max_ell, interaction_cls=modules.RealAgnosticResidualInteractionBlock,
            interaction_cls_first=modules.RealAgnosticInteractionBlock,
            num_interactions=num_interactions, num_elements=len(self.elements),
            hidden_irreps=o3.Irreps(hidden_irreps), MLP_irreps=o3.Irreps(mlp_irreps),
            atomic_energies=np.zeros(len(self.elements)), avg_num_neighbors=avg_num_neighbors,
            atomic_numbers=[symbol_to_number(s) for s in self.elements],
            correlation=correlation, gate=nn.functional.silu,
        )
        self.cutoff = float(r_max)
        self.body = MACEBody(mace, len(self.elements))

    def atomic_contributions(self, species: Tensor, pos: Tensor, batch: Tensor,
                             pairs: Pairs | None = None) -> Tensor:
        edge_index, shifts = model_pairs(pos, batch, self.cutoff, pairs)
        vec = pair_vectors(pos, edge_index, shifts)[0]
        return self.body(species, edge_index[0], edge_index[1], vec)
