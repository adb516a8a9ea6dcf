"""``ekd-export model.ckpt model.pt``: a trained potential for the engines users run MD in.

By default the file is a **metatomic model** (:mod:`ekd_lightning.inference.metatomic_model`; energy in
eV, lengths in Å, periodic cells through the engine's neighbour list): ASE loads it with
metatomic-ase, torch-sim with metatomic-torchsim, LAMMPS with ``pair_style metatomic``.
``ekd-export a.ckpt b.ckpt c.ckpt ensemble.pt`` writes an ensemble (mean energy, and
``energy_ensemble`` / ``energy_uncertainty``). See docs/using-a-trained-model.md.

``--format torchscript`` writes the earlier plain TorchScript file, for a user with torch alone
(no metatomic, e.g. C++ through libtorch): it loads with ``torch.jit.load`` alone (no
ekd-lightning, Lightning or PyG) and holds a module scripted from the model's own weights, for
molecules of any size and composition of the model's elements, no periodic cell:

.. code-block:: python

    model = torch.jit.load("model.pt")
    energy = model(numbers, positions)          # () float64, Hartree
    energy, forces = model.energy_and_forces(numbers, positions)  # forces (n_atoms, 3) Hartree/Å
    model.elements                               # ["H", "C", "N", "O"]

``numbers``: (n_atoms,) int64 atomic numbers; ``positions``: (n_atoms, 3) Å, one molecule.
``forward`` is differentiable in ``positions``; ``energy_and_forces`` returns F = -dE/dx. The
model computes in the dtype it was trained in (float32): energies and forces agree with
ekd-lightning's to float32 rounding.

Both formats share one scriptable port per architecture (:class:`ExportedANI`,
:class:`ExportedSchNet`, :class:`ExportedViSNet`, :class:`ExportedMACE`) working on a full
neighbour list.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.errors import CheckpointError, ConfigError, EKDError
from ..core.files import atomic_path, write_atomic
from ..core.hashing import file_sha256
from ..models.aev import angular_triples, cosine_cutoff
from ..models.ani import ANIModel
from ..models.base import AtomisticModel
from ..models.schnet import SchNetModel
from ..models.visnet import ViSNetModel
from ..task.checkpoint import load_potential


class _Exported(nn.Module):
    """What every exported model shares: element checks, the energy sum (with the model's pair
    repulsion prior, if any), forces by autograd.

    Subclasses implement ``contributions(species, i, j, vec) -> (n_atoms,)``, the dimensionless
    per-atom outputs from a full neighbour list: directed pairs (i, j) in both directions and
    their vectors ``vec`` = r_j - r_i (+ the periodic image's shift) (n_pairs, 3) Å; pairs
    beyond the model's ``cutoff`` (Å) are ignored, so an engine's list may reach farther.
    """

    def __init__(self, model: AtomisticModel, name: str, source_sha256: str):
        super().__init__()
        self.elements: list[str] = list(model.elements)
        self.model_name: str = name
        self.source_sha256: str = source_sha256  # of the checkpoint
        self.energy_unit: str = "Hartree"
        self.length_unit: str = "Angstrom"
        self.cutoff: float = float(model.cutoff)
        self.interaction_range: float = float(model.cutoff)  # message passing: times the layers
        self.register_buffer("species_of_number", model.species_of_number.clone())
        self.register_buffer("self_energies", model.self_energies.clone())  # (S,) Hartree, f64
        self.register_buffer("energy_scale", model.energy_scale.clone())  # () Hartree, f64
        self.repulsion = copy.deepcopy(model.repulsion)  # the pair prior, or None

    def species(self, numbers: Tensor, positions: Tensor) -> Tensor:
        """Species index (n_atoms,) of the atomic numbers; an error for bad input."""
        if numbers.dim() != 1 or positions.dim() != 2 or positions.shape[0] != numbers.shape[0] \
                or positions.shape[1] != 3:
            raise ValueError("expected numbers (n_atoms,) and positions (n_atoms, 3) in Å")
        if bool(((numbers < 0) | (numbers > 118)).any()):
            raise ValueError("atomic numbers must lie in 0..118")
        species = self.species_of_number[numbers]
        if bool((species < 0).any()):
            unknown: list[int] = numbers[species < 0].tolist()
            raise ValueError("atomic number(s) " + str(unknown) + " not among this model's "
                             "elements " + str(self.elements))
        return species

    def contributions(self, species: Tensor, i: Tensor, j: Tensor, vec: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.jit.export
    def atomic_energies(self, species: Tensor, i: Tensor, j: Tensor, vec: Tensor) -> Tensor:
        """Per-atom energies (n_atoms,) float64 Hartree from a full neighbour list (see the
        class); their sum is the energy, differentiable in ``vec``."""
        atomic = self.energy_scale * self.contributions(species, i, j, vec).to(torch.float64)
        atomic = atomic + self.self_energies[species]
        if self.repulsion is not None:
            atomic = atomic + self.repulsion(species, i, j, vec)
        return atomic

    def forward(self, numbers: Tensor, positions: Tensor) -> Tensor:
        """Energy () float64 in Hartree of one molecule: numbers (n_atoms,), positions
        (n_atoms, 3) Å; differentiable in ``positions``."""
        species = self.species(numbers, positions)
        i, j = _all_pairs(positions, self.cutoff)
        vec = positions.index_select(0, j) - positions.index_select(0, i)
        return self.atomic_energies(species, i, j, vec).sum()

    @torch.jit.export
    def energy_and_forces(self, numbers: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Energy () float64 Hartree and forces F = -dE/dx (n_atoms, 3) Hartree/Å, in the
        dtype of ``positions``; needs grad mode (not inside ``torch.no_grad()``)."""
        if not torch.is_grad_enabled():
            raise RuntimeError("energy_and_forces needs autograd: call it outside torch.no_grad()")
        pos = positions.detach().requires_grad_(True)
        energy = self.forward(numbers, pos)
        grad = torch.autograd.grad([energy], [pos])[0]
        assert grad is not None
        return energy.detach(), -grad


def _all_pairs(pos: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """Directed pairs (i, j), both directions, of a molecule's atoms closer than ``cutoff`` Å:
    ``i``, ``j`` (n_pairs,)."""
    n = pos.shape[0]
    ij = torch.triu_indices(n, n, 1, device=pos.device)
    with torch.no_grad():
        close = (pos.index_select(0, ij[1]) - pos.index_select(0, ij[0])).norm(2, -1) < cutoff
    keep = torch.nonzero(close).squeeze(1)
    first, second = ij[0].index_select(0, keep), ij[1].index_select(0, keep)
    return torch.cat([first, second]), torch.cat([second, first])


def _within(i: Tensor, j: Tensor, vec: Tensor, cutoff: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pairs of a neighbour list closer than ``cutoff`` Å, sorted by i (stable): i, j,
    their vectors (n, 3) and distances (n,) Å."""
    dist = vec.norm(2, -1)
    keep = torch.nonzero(dist.detach() < cutoff).squeeze(1)
    order = keep.index_select(0, torch.sort(i.index_select(0, keep), stable=True)[1])
    return (i.index_select(0, order), j.index_select(0, order), vec.index_select(0, order),
            dist.index_select(0, order))


class ExportedANI(_Exported):
    """:class:`~ekd_lightning.models.ani.ANIModel` in scriptable torch: the same AEV
    (:class:`~ekd_lightning.models.aev.ANIAEV`, every species' features; those of absent
    species are zero) and the same element networks, in the dtype of their weights."""

    def __init__(self, model: ANIModel, name: str = "ani2x", source_sha256: str = ""):
        super().__init__(model, name, source_sha256)
        aev, dtype = model.aev, model.dtype
        for buffer in ("radial_shifts", "angular_shifts", "angular_sections"):
            self.register_buffer(buffer, getattr(aev, buffer).to(dtype))
        self.register_buffer("triu_index", aev.triu_index.clone())
        self.radial_cutoff, self.angular_cutoff = aev.radial_cutoff, aev.angular_cutoff
        self.radial_eta, self.angular_eta = aev.radial_eta, aev.angular_eta
        self.angular_zeta = aev.angular_zeta
        self.num_species, self.num_species_pairs = aev.num_species, aev.num_species_pairs
        self.radial_features, self.angular_features = aev.radial_features, aev.angular_features
        self.networks = nn.ModuleList([copy.deepcopy(model.networks[e]) for e in model.elements])

    def aev(self, species: Tensor, i: Tensor, j: Tensor, vec: Tensor) -> Tensor:
        """AEVs (n_atoms, out_dim) from a full neighbour list (i, j, vec Å)."""
        n = species.shape[0]
        i, j, vec, dist = _within(i, j, vec, self.radial_cutoff)
        gauss = torch.exp(-self.radial_eta * (dist.unsqueeze(-1) - self.radial_shifts) ** 2)
        radial = 0.25 * gauss * cosine_cutoff(dist, self.radial_cutoff).unsqueeze(-1)
        s = self.num_species
        radial_aev = vec.new_zeros(n * s, self.radial_features)
        radial_aev = radial_aev.index_add(0, i * s + species[j], radial)  # each direction once

        # pairs within the angular cutoff (sorted by centre); triples {j, k} per centre
        close = torch.nonzero(dist.detach() < self.angular_cutoff).squeeze(1)
        centre, other = i.index_select(0, close), j.index_select(0, close)
        cvec, cdist = vec.index_select(0, close), dist.index_select(0, close)
        p, q = angular_triples(centre, n)
        vec_j, vec_k = cvec.index_select(0, p), cvec.index_select(0, q)
        d_j, d_k = cdist.index_select(0, p), cdist.index_select(0, q)
        cos_angle = (vec_j * vec_k).sum(-1) / torch.clamp(d_j * d_k, min=1e-10)
        x = (0.95 * cos_angle).unsqueeze(-1)
        sections = self.angular_sections
        cos_dev = x * torch.cos(sections) + torch.sqrt(1.0 - x * x) * torch.sin(sections)
        angular = 2.0 * ((1.0 + cos_dev) * 0.5) ** self.angular_zeta  # (T, sections)
        mean = (0.5 * (d_j + d_k)).unsqueeze(-1)
        cut = cosine_cutoff(d_j, self.angular_cutoff) * cosine_cutoff(d_k, self.angular_cutoff)
        shells = torch.exp(-self.angular_eta * (mean - self.angular_shifts) ** 2) * cut.unsqueeze(-1)
        terms = (shells.unsqueeze(-1) * angular.unsqueeze(-2)).flatten(1)  # shift slow
        block = self.triu_index[species[other.index_select(0, p)], species[other.index_select(0, q)]]
        angular_aev = vec.new_zeros(n * self.num_species_pairs, self.angular_features)
        angular_aev = angular_aev.index_add(0, centre.index_select(0, p) * self.num_species_pairs
                                            + block, terms)
        return torch.cat([radial_aev.view(n, -1), angular_aev.view(n, -1)], dim=1)

    def contributions(self, species: Tensor, i: Tensor, j: Tensor, vec: Tensor) -> Tensor:
        features = self.aev(species, i, j, vec.to(self.radial_shifts.dtype))
        out = features.new_zeros(species.shape[0])
        for s, network in enumerate(self.networks):
            atoms = torch.nonzero(species == s).squeeze(1)
            out = out.index_copy(0, atoms, network(features.index_select(0, atoms)).squeeze(-1))
        return out


class _Interaction(nn.Module):
    """One SchNet interaction block (torch_geometric's ``InteractionBlock``), as plain torch."""

    def __init__(self, block):
        super().__init__()
        self.filter, self.act = copy.deepcopy(block.mlp), copy.deepcopy(block.act)
        self.lin1, self.lin2 = copy.deepcopy(block.conv.lin1), copy.deepcopy(block.conv.lin2)
        self.lin = copy.deepcopy(block.lin)

    def forward(self, h: Tensor, source: Tensor, target: Tensor, expansion: Tensor,
                envelope: Tensor) -> Tensor:
        weight = self.filter(expansion) * envelope.unsqueeze(-1)
        x = self.lin1(h)
        x = torch.zeros_like(x).index_add(0, target, x.index_select(0, source) * weight)
        return self.lin(self.act(self.lin2(x)))


class ExportedSchNet(_Exported):
    """:class:`~ekd_lightning.models.schnet.SchNetModel` for one molecule in scriptable torch
    (the same submodules and weights; message passing as ``index_add``)."""

    def __init__(self, model: SchNetModel, name: str = "schnet", source_sha256: str = ""):
        super().__init__(model, name, source_sha256)
        net = model.net
        self.interaction_range = self.cutoff * len(net.interactions)
        self.embedding = copy.deepcopy(net.embedding)
        self.register_buffer("offset", net.distance_expansion.offset.clone())
        self.coeff = float(net.distance_expansion.coeff)
        self.interactions = nn.ModuleList([_Interaction(b) for b in net.interactions])
        self.lin1, self.act, self.lin2 = (copy.deepcopy(m) for m in (net.lin1, net.act, net.lin2))

    def contributions(self, species: Tensor, i: Tensor, j: Tensor, vec: Tensor) -> Tensor:
        target, source, _, dist = _within(i, j, vec.to(self.offset.dtype), self.cutoff)
        expansion = torch.exp(self.coeff * (dist.unsqueeze(-1) - self.offset) ** 2)
        envelope = 0.5 * (torch.cos(dist * math.pi / self.cutoff) + 1.0)
        h = self.embedding(species + 1)  # index 0 is SchNet's padding
        for interaction in self.interactions:
            h = h + interaction(h, source, target, expansion, envelope)
        return self.lin2(self.act(self.lin1(h))).squeeze(-1)


class _ViSLayer(nn.Module):
    """The messages of one ViSNet layer (torch-geometric's ``ViS_MP``, ``vecnorm_type=None``)
    as plain torch, on directed pairs ``target`` <- ``source`` (torch-geometric's ``x_i`` and
    ``x_j``; sums over the pairs of each target)."""

    def __init__(self, layer):
        super().__init__()
        if layer.vec_layernorm.norm_type is not None or type(layer).__name__ != "ViS_MP":
            raise CheckpointError("ViSNet export supports ViS_MP layers with vecnorm_type=None "
                                  f"only (got {type(layer).__name__}, "
                                  f"{layer.vec_layernorm.norm_type!r})")
        self.num_heads, self.head_dim = layer.num_heads, layer.head_dim
        self.hidden_channels = layer.hidden_channels
        self.cutoff = float(layer.cutoff.cutoff)
        self.layernorm = copy.deepcopy(layer.layernorm)
        self.register_buffer("vec_norm_weight", layer.vec_layernorm.weight.detach().clone())
        for name in ("vec_proj", "q_proj", "k_proj", "v_proj", "dk_proj", "dv_proj", "s_proj",
                     "o_proj"):
            setattr(self, name, copy.deepcopy(getattr(layer, name)))

    def forward(self, x: Tensor, vec: Tensor, target: Tensor, source: Tensor, dist: Tensor,
                f: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Updates ``(dx (n_atoms, H), dvec (n_atoms, L, H), vec_normed (n_atoms, L, H))``
        from scalars ``x`` (n_atoms, H), vectors ``vec`` (n_atoms, L, H), the pairs' distances
        ``dist`` (n_pairs,) Å, features ``f`` (n_pairs, H) and spherical harmonics ``d``
        (n_pairs, L) of the unit vector r_source - r_target (L = (lmax + 1)^2 - 1)."""
        x = self.layernorm(x)
        vec = vec * self.vec_norm_weight  # VecLayerNorm without a norm
        shape = [-1, self.num_heads, self.head_dim]
        q, k, v = (self.q_proj(x).view(shape), self.k_proj(x).view(shape),
                   self.v_proj(x).view(shape))
        dk = nn.functional.silu(self.dk_proj(f)).view(shape)
        dv = nn.functional.silu(self.dv_proj(f)).view(shape)
        vec1, vec2, vec3 = torch.split(self.vec_proj(vec), self.hidden_channels, dim=-1)
        vec_dot = (vec1 * vec2).sum(dim=1)

        attn = (q.index_select(0, target) * k.index_select(0, source) * dk).sum(dim=-1)
        envelope = 0.5 * (torch.cos(dist * math.pi / self.cutoff) + 1.0)
        attn = nn.functional.silu(attn) * envelope.unsqueeze(1)
        message = (v.index_select(0, source) * dv * attn.unsqueeze(2)).view(-1, self.hidden_channels)
        s1, s2 = torch.split(nn.functional.silu(self.s_proj(message)), self.hidden_channels, dim=1)
        vec_message = vec.index_select(0, source) * s1.unsqueeze(1) + s2.unsqueeze(1) * d.unsqueeze(2)
        summed = torch.zeros_like(x).index_add(0, target, message)
        vec_summed = torch.zeros_like(vec).index_add(0, target, vec_message)

        o1, o2, o3 = torch.split(self.o_proj(summed), self.hidden_channels, dim=1)
        return vec_dot * o2 + o3, vec3 * o1.unsqueeze(1) + vec_summed, vec


class _ViSEdgeUpdate(nn.Module):
    """The pair-feature update of a ViSNet layer but the last (``ViS_MP.edge_update``)."""

    def __init__(self, layer):
        super().__init__()
        self.f_proj, self.w_src_proj, self.w_trg_proj = (
            copy.deepcopy(m) for m in (layer.f_proj, layer.w_src_proj, layer.w_trg_proj))

    def forward(self, vec: Tensor, target: Tensor, source: Tensor, f: Tensor, d: Tensor) -> Tensor:
        """``df`` (n_pairs, H) from the layer's normalised vectors ``vec`` (n_atoms, L, H)."""
        w1 = _rejection(self.w_trg_proj(vec.index_select(0, target)), d)
        w2 = _rejection(self.w_src_proj(vec.index_select(0, source)), -d)
        return nn.functional.silu(self.f_proj(f)) * (w1 * w2).sum(dim=1)


def _rejection(vec: Tensor, d: Tensor) -> Tensor:
    """The part of ``vec`` (n, L, H) orthogonal to ``d`` (n, L) (``ViS_MP.vector_rejection``)."""
    return vec - (vec * d.unsqueeze(2)).sum(dim=1, keepdim=True) * d.unsqueeze(2)


class _GatedBlock(nn.Module):
    """torch-geometric's ``GatedEquivariantBlock`` (the same submodules)."""

    def __init__(self, block):
        super().__init__()
        self.out_channels: int = block.out_channels
        self.vec1_proj, self.vec2_proj = copy.deepcopy(block.vec1_proj), copy.deepcopy(block.vec2_proj)
        self.update_net = copy.deepcopy(block.update_net)
        self.scalar_activation: bool = block.act is not None

    def forward(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        vec1 = torch.norm(self.vec1_proj(v), dim=-2)
        vec2 = self.vec2_proj(v)
        x, v = torch.split(self.update_net(torch.cat([x, vec1], dim=-1)), self.out_channels, dim=-1)
        if self.scalar_activation:
            x = nn.functional.silu(x)
        return x, v.unsqueeze(1) * vec2


class ExportedViSNet(_Exported):
    """:class:`~ekd_lightning.models.visnet.ViSNetModel` in scriptable torch: torch-geometric's
    ``ViSNetBlock`` (``vecnorm_type=None``, ``vertex=False``, ``lmax`` 1 or 2) and
    ``EquivariantScalar.pre_reduce`` re-written with ``index_add`` message passing, from the
    same submodules and weights.

    A pair (i, j) of the neighbour list, ``vec`` = r_j - r_i (+ shift), is torch-geometric's
    edge from source j to target i with edge vector r_source - r_target = ``vec``, as
    :class:`~ekd_lightning.models.visnet._PairDistances` gives it; an atom's own periodic image
    within the cutoff is an error, as for the model. An atom's output depends on atoms up to
    ``(num_layers + 1) * cutoff`` away (the neighbour embedding is one more hop).
    """

    def __init__(self, model: ViSNetModel, name: str = "visnet_small", source_sha256: str = ""):
        super().__init__(model, name, source_sha256)
        block = model.representation
        if block.lmax not in (1, 2):
            raise CheckpointError(f"ViSNet export supports lmax 1 or 2 (got {block.lmax})")
        self.lmax: int = block.lmax
        self.num_components: int = (block.lmax + 1) ** 2 - 1  # of the vector features
        self.interaction_range = self.cutoff * (len(block.vis_mp_layers) + 1)
        self.embedding = copy.deepcopy(block.embedding)
        rbf = block.distance_expansion
        self.register_buffer("rbf_means", rbf.means.detach().clone())
        self.register_buffer("rbf_betas", rbf.betas.detach().clone())
        self.rbf_alpha = float(rbf.alpha)
        neighbors = block.neighbor_embedding
        self.neighbor_embedding = copy.deepcopy(neighbors.embedding)
        self.distance_proj = copy.deepcopy(neighbors.distance_proj)
        self.combine = copy.deepcopy(neighbors.combine)
        self.edge_proj = copy.deepcopy(block.edge_embedding.edge_proj)
        layers = list(block.vis_mp_layers)
        self.layers = nn.ModuleList([_ViSLayer(layer) for layer in layers[:-1]])
        self.edge_updates = nn.ModuleList([_ViSEdgeUpdate(layer) for layer in layers[:-1]])
        self.last_layer = _ViSLayer(layers[-1])
        self.out_norm = copy.deepcopy(block.out_norm)
        if block.vec_out_norm.norm_type is not None:
            raise CheckpointError("ViSNet export supports vecnorm_type=None only")
        self.register_buffer("vec_out_norm_weight", block.vec_out_norm.weight.detach().clone())
        self.head = nn.ModuleList([_GatedBlock(b) for b in model.head.output_network])

    def sphere(self, unit: Tensor) -> Tensor:
        """torch-geometric's ``Sphere``: (n, 3) unit vectors -> (n, 3) for lmax 1, (n, 8) for 2."""
        x, y, z = unit[:, 0], unit[:, 1], unit[:, 2]
        if self.lmax == 1:
            return unit
        s3 = math.sqrt(3.0)
        return torch.stack([x, y, z, s3 * x * z, s3 * x * y, y * y - 0.5 * (x * x + z * z),
                            s3 * y * z, s3 / 2.0 * (z * z - x * x)], dim=-1)

    def contributions(self, species: Tensor, i: Tensor, j: Tensor, vec: Tensor) -> Tensor:
        target, source, vec, dist = _within(i, j, vec.to(self.rbf_means.dtype), self.cutoff)
        if bool((target == source).any()):
            raise ValueError("ViSNet: an atom's own periodic image lies within the cutoff; make "
                             "the periodic cell wider than the cutoff along each axis")
        envelope = 0.5 * (torch.cos(dist * math.pi / self.cutoff) + 1.0)  # (n_pairs,)
        rbf = envelope.unsqueeze(-1) * torch.exp(  # ExpNormalSmearing (n_pairs, num_rbf)
            -self.rbf_betas * (torch.exp(-self.rbf_alpha * dist.unsqueeze(-1)) - self.rbf_means) ** 2)
        d = self.sphere(vec / dist.unsqueeze(-1))

        x = self.embedding(species)  # NeighborEmbedding, then EdgeEmbedding
        weight = self.distance_proj(rbf) * envelope.unsqueeze(-1)
        neighbors = torch.zeros_like(x).index_add(
            0, target, self.neighbor_embedding(species).index_select(0, source) * weight)
        x = self.combine(torch.cat([x, neighbors], dim=1))
        vectors = x.new_zeros(x.shape[0], self.num_components, x.shape[1])
        f = (x.index_select(0, target) + x.index_select(0, source)) * self.edge_proj(rbf)

        for layer, edge_update in zip(self.layers, self.edge_updates, strict=True):
            dx, dvec, normed = layer(x, vectors, target, source, dist, f, d)
            f = f + edge_update(normed, target, source, f, d)
            x, vectors = x + dx, vectors + dvec
        dx, dvec, _ = self.last_layer(x, vectors, target, source, dist, f, d)
        x = self.out_norm(x + dx)
        vectors = (vectors + dvec) * self.vec_out_norm_weight
        for block in self.head:  # EquivariantScalar.pre_reduce
            x, vectors = block(x, vectors)
        return x.squeeze(-1)


class ExportedMACE(_Exported):
    """:class:`~ekd_lightning.models.mace.MACEModel`: its :class:`~ekd_lightning.models.mace.MACEBody`
    (the very forward the model trains with), compiled by e3nn's TorchScript compiler
    (``e3nn.util.jit.compile``, which scripts e3nn's generated tensor products). An atom's
    output depends on atoms up to ``num_interactions * cutoff`` away."""

    def __init__(self, model: AtomisticModel, name: str = "mace_small", source_sha256: str = ""):
        from e3nn.util import jit as e3nn_jit

        super().__init__(model, name, source_sha256)
        self.interaction_range = self.cutoff * len(model.body.interactions)
        self.body = e3nn_jit.compile(copy.deepcopy(model.body))

    def contributions(self, species: Tensor, i: Tensor, j: Tensor, vec: Tensor) -> Tensor:
        i, j, vec, _ = _within(i, j, vec, self.cutoff)
        return self.body(species, i, j, vec)


def exported_module(model: AtomisticModel, name: str, source_sha256: str = "") -> _Exported:
    """The scriptable port of ``model`` (ANI, SchNet, ViSNet or MACE), recording the model name
    and the checkpoint's SHA-256; CheckpointError, one line, for a model without one."""
    if type(model).__name__ == "MACEModel":  # mace-torch is an extra: not imported here
        return ExportedMACE(model, name, source_sha256).eval()
    if isinstance(model, ANIModel):
        return ExportedANI(model, name, source_sha256).eval()
    if isinstance(model, SchNetModel):
        return ExportedSchNet(model, name, source_sha256).eval()
    if isinstance(model, ViSNetModel):
        return ExportedViSNet(model, name, source_sha256).eval()
    raise CheckpointError(f"cannot export a {type(model).__name__} ({name}): ekd-export has "
                          "scriptable ports of ANI, SchNet, ViSNet and MACE models only")


def script_model(model: AtomisticModel, name: str, source_sha256: str = ""):
    """The TorchScript module of ``model`` (:func:`exported_module`)."""
    with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit as deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(exported_module(model, name, source_sha256))


def probe_molecules(elements: Sequence[str], seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Made-up molecules (numbers (n,), positions (n, 3) Å) to compare an export with its model:
    one per element alone and mixtures of all of them, 1 to 40 atoms (atoms >= 0.9 Å apart)."""
    from ..core.units import symbol_to_number

    rng = torch.Generator().manual_seed(seed)
    numbers = torch.tensor([symbol_to_number(e) for e in elements])
    compositions = [numbers[[k] * 3] for k in range(len(numbers))] + [numbers[:1]]
    compositions += [numbers[torch.randint(len(numbers), (n,), generator=rng)] for n in (12, 40)]
    molecules = []
    for z in compositions:
        pos = torch.zeros(0, 3, dtype=torch.float64)
        while len(pos) < len(z):  # random points in a box of about 1.2 Å^3 per atom
            trial = torch.rand(1, 3, generator=rng, dtype=torch.float64) * (1.2 * len(z)) ** (1 / 3) * 1.6
            if len(pos) == 0 or torch.cdist(trial, pos).min() > 0.9:
                pos = torch.cat([pos, trial])
        molecules.append((z, pos))
    return molecules


def check_export(model: AtomisticModel, scripted, rtol: float = 1e-4) -> float:
    """Largest force difference (Hartree/Å) of ``scripted`` against ``model`` on
    :func:`probe_molecules`; CheckpointError if a force differs by more than ``rtol`` of the
    largest force or an energy by more than ``rtol`` of the atomic contributions' scale
    (``energy_scale`` × n_atoms): float32 rounding is about 1e-6 of them."""
    from ..models.base import energy_and_forces

    worst, dtype = 0.0, next(model.parameters()).dtype
    for z, pos in probe_molecules(model.elements):
        pos = pos.to(dtype)
        e, f = energy_and_forces(model, z, pos, torch.zeros(len(z), dtype=torch.long), 1)
        e, f = e.detach(), f.detach()
        e_s, f_s = scripted.energy_and_forces(z, pos)
        error = float((f - f_s).abs().max())
        worst = max(worst, error)
        e_tol = rtol * float(model.energy_scale) * len(z) + 1e-9  # contributions are O(1)
        if abs(float(e[0]) - float(e_s)) > e_tol or error > rtol * float(f.abs().max()) + 1e-9:
            raise CheckpointError(f"exported model differs from the original on {z.tolist()}: "
                                  f"energy {float(e_s)} vs {float(e[0])} Hartree")
    return worst


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the plain TorchScript file of a checkpoint to ``out`` (atomically), checked
    against the checkpoint's model on :func:`probe_molecules`."""
    module = load_potential(checkpoint)
    scripted = script_model(module.model, module.model_name, file_sha256(checkpoint))
    check_export(module.model, scripted)
    write_atomic(Path(out), lambda handle: torch.jit.save(scripted, handle))
    return Path(out)


def export_metatomic(checkpoints: Sequence[str | Path], out: str | Path,
                     dtype: torch.dtype = torch.float64) -> Path:
    """Write the metatomic model of one checkpoint, or of an ensemble (several), to ``out``
    (atomically): each member's port checked against its model (:func:`check_export`), then
    wrapped by :func:`ekd_lightning.inference.metatomic_model.atomistic_model`. ConfigError, one line,
    when metatomic-torch is not installed."""
    try:
        from .metatomic_model import atomistic_model
    except ImportError as exc:
        raise ConfigError(f"writing a metatomic model needs metatomic-torch ({exc}): pip install "
                          "'ekd-lightning[engines]', or pass --format torchscript") from None
    members, names = [], []
    for checkpoint in checkpoints:
        module = load_potential(checkpoint)
        member = exported_module(module.model, module.model_name, file_sha256(checkpoint))
        check_export(module.model, script_model(module.model, module.model_name))
        members.append(member)
        names.append(f"{module.model_name} ({Path(checkpoint).name}, sha256 "
                     f"{member.source_sha256[:12]})")
    kind = "ensemble mean of " if len(members) > 1 else ""
    model = atomistic_model(members, f"ekd-{'+'.join(m.model_name for m in members)}",
                            f"ekd-lightning potential: {kind}{', '.join(names)}", dtype)
    out = Path(out)
    with atomic_path(out) as tmp:  # metatomic saves to a path: written beside ``out``, renamed
        model.save(str(tmp))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ekd-export", description="Export a trained potential, or an ensemble of them, as "
        "a metatomic model (energy in eV, lengths in Å) that ASE (metatomic-ase), torch-sim "
        "(metatomic-torchsim) and LAMMPS (pair_style metatomic) load; or, with --format "
        "torchscript, as a plain TorchScript file for torch alone: model(numbers, positions Å) "
        "-> energy Hartree of one molecule.")
    parser.add_argument("checkpoints", nargs="+", metavar="checkpoint",
                        help="a .ckpt written by training; several: an ensemble (metatomic)")
    parser.add_argument("out", help="the file to write, e.g. model.pt")
    parser.add_argument("--format", choices=("metatomic", "torchscript"), default="metatomic")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="metatomic: the precision the engine computes in (default float64)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.format == "torchscript":
            if len(args.checkpoints) > 1:
                raise ConfigError("--format torchscript exports one checkpoint; an ensemble "
                                  "needs --format metatomic")
            out = export_checkpoint(args.checkpoints[0], args.out)
            print(f"wrote {out}: torch.jit.load('{out}')(numbers, positions) -> energy in Hartree")
        else:
            out = export_metatomic(args.checkpoints, args.out, getattr(torch, args.dtype))
            print(f"wrote {out}: a metatomic model (eV, Å) for metatomic-ase, "
                  "metatomic-torchsim and LAMMPS pair_style metatomic")
    except EKDError as exc:
        print(f"ekd-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
