"""A teacher ensemble evaluated as few batched modules, with each teacher's energy and forces.

Teachers are grouped by architecture (:func:`group_key`). ANI teachers with the same elements,
AEV constants, layer sizes and activation form a :class:`StackedANI`:

1. neighbour pairs, triples and the AEV are computed once per batch by
   :func:`aev_with_jacobian`, with :class:`~ekd_lightning.models.aev.ANIAEV`'s own pairs,
   triples and term functions (so the same features), together with the analytic derivatives
   of every radial term (by the pair distance) and angular term (by cos theta and the two
   distances), which ``ANIAEV.radial_terms`` / ``ANIAEV.angular_factors`` give alongside;
2. the T teachers' element networks run on stacked weights: the first layer as one wide GEMM
   (F, T * H0), the others as batched matrix products (T, in, out); the gradients of the outputs
   with respect to the AEV are back-propagated by hand through the MLPs, T cotangents at once,
   with the activation's derivative from :func:`~ekd_lightning.models.ani.activation_backward`;
3. the AEV's vector-Jacobian product with those T cotangents (:func:`aev_vjp`) gives every
   teacher's forces F = -dE/dx: per pair and per triple contractions, one scatter onto atoms.

Alternatives measured on 2 CPU cores (8 ANI teachers, 64 molecules, 585 atoms): the VJP as
``torch.autograd.grad(aev, pos, grad_outputs=G, is_grads_batched=True)`` took about 30 ms and a
loop of 8 ``autograd.grad`` calls on the AEV graph about 24 ms, against about 6 ms here; term
derivatives by ``torch.func.jvp``/``vmap`` took about 24 ms against about 3 ms analytically.

Other teachers (e.g. SchNet) form a :class:`TeacherLoop`: members evaluated one after another
with autograd. So does an ANI teacher whose networks :class:`StackedANI` cannot stack (another
layer structure, or an activation without a rule in ``activation_backward``), with a warning
that names the reason (:func:`_stack_plan`). Every group returns per-teacher energies
(T, n_molecules) in Hartree (float64, as the models do) and forces (T, n_atoms, 3) in Hartree/Å.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models.aev import ANIAEV, TermLayout, scatter_terms
from ..models.ani import ANIModel, activation_backward, group_by_species
from ..models.base import AtomisticModel, energy_and_forces

log = logging.getLogger(__name__)


def _stack_plan(model: AtomisticModel) -> tuple[dict[str, list[nn.Linear]], nn.Module] | str:
    """The Linear layers per element and the activation of an ANI model that
    :class:`StackedANI` can evaluate, or why it cannot (then :class:`TeacherLoop` does, with
    autograd): every element network must be Linear, activation, ..., Linear with biases and
    at least one hidden layer, with one activation throughout that has a rule in
    :func:`~ekd_lightning.models.ani.activation_backward`."""
    if type(model) is not ANIModel:
        return f"{type(model).__name__} has no batched implementation"
    if model.repulsion is not None:
        return "it carries a pair repulsion prior, which StackedANI does not add"
    layers, activations = {}, set()
    for element, net in model.networks.items():
        modules = list(net)
        linears, between = modules[0::2], modules[1::2]
        if (len(linears) < 2 or len(linears) != len(between) + 1
                or not all(isinstance(m, nn.Linear) and m.bias is not None for m in linears)):
            return f"the {element} network is not Linear, activation, ..., Linear with biases"
        layers[element] = linears
        activations |= {repr(a) for a in between}
        unknown = [a for a in between if activation_backward(a) is None]
        if unknown:
            return f"activation {unknown[0]!r} has no rule in models.ani.activation_backward"
    if len(activations) != 1:
        return f"the element networks mix activations {sorted(activations)}"
    return layers, between[0]


def group_key(model: AtomisticModel) -> tuple:
    """Teachers with equal keys can be stacked into one batched module.

    ANI teachers: same class, elements, AEV constants, layer sizes, activation and dtype. Any
    other model gets a key of its class and dtype (evaluated in a loop within the group).
    """
    dtype = next(model.parameters()).dtype
    plan = _stack_plan(model)
    if isinstance(plan, str):
        return ("loop", type(model).__name__, dtype)
    sizes = tuple((e, tuple(model.hidden[e])) for e in model.elements)
    return ("ani", tuple(model.elements), tuple(sorted(model.aev.config.items())), sizes,
            repr(plan[1]), dtype)


@dataclass
class AEVJacobian:
    """What the AEV's vector-Jacobian product needs, from :func:`aev_with_jacobian`.

    Radial terms come from the pairs i < j (``first``, ``second``) and depend on the distance
    only; angular terms come from the triples (centre; j, k) and depend on cos(theta_ijk) and
    on the two distances. Where each term went: the AEV row of each atom is ``rows`` (atom
    order unless a ``rank`` was given) and ``layout`` places the terms within the rows.
    """

    num_atoms: int
    radial_width: int
    angular_width: int
    rows: Tensor  # (n_atoms,) AEV row of each atom
    layout: TermLayout
    first: Tensor  # (n_half,) atom i of each pair i < j
    second: Tensor  # (n_half,) atom j
    unit: Tensor  # (n_half, 3) (r_j - r_i) / |r_j - r_i|
    radial_grad: Tensor  # (n_half, radial_width) d term / d distance, 1/Å
    centre: Tensor  # (n_triples,)
    neighbours: Tensor  # (2, n_triples) atoms j and k
    angular_grad: Tensor  # (n_triples, angular_width, 3) d term / d (cos theta, d_ij, d_ik)
    geometry: Tensor  # (4, n_triples, 3): d cos / d vec_j, d cos / d vec_k, unit_j, unit_k

    def units(self, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Unit indices of the radial (2, ...) and angular (...) terms in an AEV (or a
        cotangent) whose atom rows are ``rows`` (default: :attr:`rows`)."""
        return self.layout.units(self.rows if rows is None else rows)


def _outer(r: Tensor, a: Tensor) -> Tensor:
    """Per-triple outer products (T, R * A), R index slow, of r (T, R) and a (T, A)."""
    return (r.unsqueeze(-1) * a.unsqueeze(-2)).flatten(1)


@torch.no_grad()
def aev_with_jacobian(aev: ANIAEV, species: Tensor, pos: Tensor, batch: Tensor,
                      rank: Tensor | None = None) -> tuple[Tensor, AEVJacobian]:
    """AEVs (n_atoms, out_dim) exactly as ``aev(species, pos, batch, rank)``, and the
    derivatives of their radial and angular terms (analytic, no autograd graph).

    The pairs, triples, terms and their derivatives and the sums into the AEV are
    :class:`~ekd_lightning.models.aev.ANIAEV`'s own (:meth:`~ANIAEV.neighbourhood`,
    :meth:`~ANIAEV.radial_terms`, :meth:`~ANIAEV.angular_factors`, ``scatter_terms``): bitwise
    the same AEV. ``rank`` (optional permutation) writes atom i's AEV to row ``rank[i]``.
    """
    hood = aev.neighbourhood(species, pos.detach(), batch, rank)
    radial_terms, radial_grad = aev.radial_terms(hood.dist, derivative=True)
    d_j, d_k = hood.d_j.unsqueeze(-1), hood.d_k.unsqueeze(-1)
    left, right, deriv = aev.angular_factors(hood.vec_j, hood.vec_k, hood.d_j, hood.d_k,
                                             derivatives=True)
    angular_grad = torch.stack([_outer(left, deriv.angular_by_cos),
                                _outer(deriv.radial_by_d_j, right),
                                _outer(deriv.radial_by_d_k, right)], dim=-1)
    geometry = torch.stack([deriv.cos_by_vec_j, deriv.cos_by_vec_k,
                            hood.vec_j / d_j, hood.vec_k / d_k])
    jacobian = AEVJacobian(
        num_atoms=hood.num_atoms, radial_width=aev.radial_features,
        angular_width=aev.angular_features, rows=hood.rows, layout=hood.layout,
        first=hood.first, second=hood.second, unit=hood.vec / hood.dist.unsqueeze(-1),
        radial_grad=radial_grad, centre=hood.centre, neighbours=hood.neighbours,
        angular_grad=angular_grad, geometry=geometry,
    )
    features = scatter_terms(radial_terms, left, right, hood.units, (hood.num_atoms, aev.out_dim))
    return features, jacobian


def aev_vjp(jac: AEVJacobian, radial: Tensor, angular: Tensor, rank: Tensor | None = None) -> Tensor:
    """Gradients (T, n_atoms, 3) of sum_t(radial[t] * AEV_radial + angular[t] * AEV_angular)
    with respect to the positions (per Å, in the cotangents' unit), for T cotangents at once.

    Args:
        jac: from :func:`aev_with_jacobian`.
        radial: (T, n_atoms, radial_length) cotangents of the radial AEV part.
        angular: (T, n_atoms, angular_length) cotangents of the angular part.
        rank: (n_atoms,) row of each atom in ``radial`` / ``angular`` (None: the rows of the
            AEV that ``jac`` came with).
    """
    return aev_vjp_full(jac, torch.cat([radial, angular], dim=-1), rank)


_CHUNK = 2048
"""Triples per chunk in :func:`aev_vjp_full` (gathered cotangents of 8 teachers stay in cache)."""


def aev_vjp_full(jac: AEVJacobian, cotangent: Tensor, rows: Tensor | None = None) -> Tensor:
    """:func:`aev_vjp` for cotangents of the whole AEV, (T, n_atoms, out_dim), whose atom rows
    are ``rows`` (None: those of the AEV that ``jac`` came with).

    Per-pair and per-triple results are kept item-major (items, T, 3) so that the scatter onto
    atoms is a row-wise ``index_add_``; the cotangents are gathered as rows of one flat view.
    """
    t = cotangent.shape[0]
    flat = cotangent.reshape(-1, jac.layout.width)  # (T * n_atoms * units per atom, width)
    teacher = torch.arange(t, device=flat.device).unsqueeze(1) * (flat.shape[0] // t)
    radial_units, angular_units = jac.units(rows)

    def gather(units: Tensor, width: int) -> Tensor:  # (T, items, width)
        return flat.index_select(0, (teacher + units).flatten()).view(t, -1, width)

    # radial: d E / d distance of each pair i < j, along the unit vector i -> j
    per_pair = gather(radial_units[0], jac.radial_width) + gather(radial_units[1], jac.radial_width)
    per_pair = (per_pair * jac.radial_grad).sum(-1)  # (T, n_half)
    along = per_pair.t().unsqueeze(-1) * jac.unit.unsqueeze(1)  # (n_half, T, 3): d E / d r_j
    # angular: d E / d (cos, d_ij, d_ik) per triple, then d E / d vec_j and d E / d vec_k
    n_triples = jac.centre.shape[0]
    k = jac.angular_width // jac.layout.width
    d_vec_j = flat.new_empty(n_triples, t, 3)
    d_vec_k = flat.new_empty(n_triples, t, 3)
    for start in range(0, n_triples, _CHUNK):
        stop = start + _CHUNK
        rows_ = gather(angular_units[start * k : stop * k], jac.angular_width)  # (T, c, width)
        g = torch.bmm(rows_.transpose(0, 1), jac.angular_grad[start:stop])  # (c, T, 3)
        d_cos_j, d_cos_k, unit_j, unit_k = jac.geometry[:, start:stop].unsqueeze(2)
        torch.add(g[:, :, :1] * d_cos_j, g[:, :, 1:2] * unit_j, out=d_vec_j[start:stop])
        torch.add(g[:, :, :1] * d_cos_k, g[:, :, 2:] * unit_k, out=d_vec_k[start:stop])
    grad = flat.new_zeros(jac.num_atoms, t, 3)
    grad.index_add_(0, jac.second, along)
    grad.index_add_(0, jac.first, along, alpha=-1)
    grad.index_add_(0, jac.neighbours[0], d_vec_j)
    grad.index_add_(0, jac.neighbours[1], d_vec_k)
    grad.index_add_(0, jac.centre, d_vec_j + d_vec_k, alpha=-1)
    return grad.transpose(0, 1)


class StackedANI(nn.Module):
    """T ANI teachers with identical architecture evaluated together.

    Args:
        models: ANIModel instances with equal :func:`group_key`; their weights, self energies
            and energy scales are copied into stacked buffers (nothing is trained here).
    """

    def __init__(self, models: Sequence[ANIModel]):
        super().__init__()
        first = models[0]
        if any(group_key(m) != group_key(first) for m in models):
            raise ValueError("StackedANI needs teachers of one ANI architecture")
        self.num_teachers = len(models)
        self.elements = list(first.elements)
        plans = [_stack_plan(m) for m in models]
        self.activation = plans[0][1]  # the teachers' activation module (equal in all)
        self.activation_backward: Callable[[Tensor, Tensor], Tensor] = activation_backward(
            self.activation)
        self.aev = copy.deepcopy(first.aev)
        self.register_buffer("species_of_number", first.species_of_number.clone(), persistent=False)
        self.register_buffer("self_energies", torch.stack([m.self_energies for m in models]))
        self.register_buffer("energy_scale", torch.stack([m.energy_scale for m in models]))
        layers = [plan[0] for plan in plans]
        self.num_layers = {}
        for s, element in enumerate(self.elements):
            per_teacher = [teacher[element] for teacher in layers]
            self.num_layers[s] = len(per_teacher[0])
            for j in range(len(per_teacher[0])):
                weight = torch.stack([t[j].weight.detach().t() for t in per_teacher])  # (T, in, out)
                bias = torch.stack([t[j].bias.detach() for t in per_teacher])  # (T, out)
                if j == 0:
                    # one wide GEMM (in, T * out) for all teachers; the transpose (T, out, in)
                    # for the backward pass
                    self.register_buffer(f"w{s}_wide", weight.permute(1, 0, 2).flatten(1).contiguous())
                    self.register_buffer(f"b{s}_wide", bias.flatten().contiguous())
                    self.register_buffer(f"wt{s}_0", weight.transpose(1, 2).contiguous())
                else:
                    self.register_buffer(f"w{s}_{j}", weight.contiguous())
                    self.register_buffer(f"wt{s}_{j}", weight.transpose(1, 2).contiguous())
                    self.register_buffer(f"b{s}_{j}", bias)
        self._restricted: dict[tuple, tuple[ANIAEV, Tensor, dict[int, tuple[Tensor, Tensor]]]] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.w0_wide.dtype

    def species(self, z: Tensor) -> Tensor:
        """Species index (n_atoms,) of atomic numbers; DataError for an unknown element."""
        return AtomisticModel.species(self, z)  # uses species_of_number and elements only

    def _first_layers(self, present: tuple[int, ...]) -> tuple[ANIAEV, Tensor | None,
                                                              dict[int, tuple[Tensor, Tensor]]]:
        """The AEV, the species map for it and the first-layer weights of each species (wide
        (F, T * H0) and transposed (T, H0, F)) for a batch of the species ``present``: all F
        features (map None), or only those of the present species (:meth:`ANIAEV.restricted`,
        the others are zero) and the matching weight rows, cached (teachers are frozen)."""
        def weights(s: int) -> tuple[Tensor, Tensor]:
            return getattr(self, f"w{s}_wide"), getattr(self, f"wt{s}_0")

        aev, compact, columns = self.aev.restricted(present)
        if columns is None:
            return aev, None, {s: weights(s) for s in present}
        key = (present, self.w0_wide.device, self.dtype)
        if key not in self._restricted:
            self._restricted[key] = (aev, compact, {
                s: (weights(s)[0].index_select(0, columns), weights(s)[1].index_select(2, columns))
                for s in present
            })
        return self._restricted[key]

    def _element_networks(self, s: int, x: Tensor, first_layer: tuple[Tensor, Tensor],
                          scale: Tensor, outputs: Tensor, cotangent: Tensor) -> None:
        """Outputs and scaled gradients for the atoms of species s.

        Args:
            s: species index.
            x: (n_e, F) AEVs of the atoms of that species.
            first_layer: the first layer's weights for these F features, wide (F, T * H0) and
                transposed (T, H0, F).
            scale: (T,) energy scale of each teacher (Hartree), folded into the gradients.
            outputs: (T, n_e) written: the dimensionless outputs.
            cotangent: (T, n_e, F) written: ``scale * d out / d AEV``, Hartree.
        """
        n_layers = self.num_layers[s]
        t = self.num_teachers
        wide, transposed = first_layer
        pre = torch.addmm(getattr(self, f"b{s}_wide"), x, wide)
        act = self.activation(pre).view(x.shape[0], t, -1).transpose(0, 1)  # (T, n_e, H0)
        acts = [act]
        for j in range(1, n_layers):
            pre = torch.baddbmm(getattr(self, f"b{s}_{j}").unsqueeze(1), acts[-1], getattr(self, f"w{s}_{j}"))
            if j < n_layers - 1:
                acts.append(self.activation(pre))
        outputs.copy_(pre.squeeze(-1))
        # backward by hand: d out / d act_{L-1} is the last weight column, then through the
        # activations (models.ani.activation_backward, from their outputs) and linear layers
        last = getattr(self, f"wt{s}_{n_layers - 1}") * scale.view(-1, 1, 1)
        grad = last.expand(t, x.shape[0], -1)
        for j in range(n_layers - 2, -1, -1):
            grad = self.activation_backward(grad, acts[j])
            if j > 0:
                grad = torch.bmm(grad, getattr(self, f"wt{s}_{j}"))
        torch.bmm(grad, transposed, out=cotangent)

    def networks(self, aev: Tensor, scale: Tensor, sizes: list[int],
                 first_layers: dict[int, tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """All teachers' element networks on AEVs grouped by species (``sizes`` atoms of each
        species in turn), with the first-layer weights of :meth:`_first_layers`.

        Returns:
            outputs (T, n_atoms), dimensionless, and ``scale * d out / d AEV`` (T, n_atoms,
            out_dim), Hartree, both in the rows of ``aev``.
        """
        t, n = self.num_teachers, aev.shape[0]
        outputs = aev.new_empty(t, n)
        cotangent = aev.new_empty(t, n, aev.shape[1])
        start = 0
        for s, size in enumerate(sizes):
            if size:
                stop = start + size
                self._element_networks(s, aev[start:stop], first_layers[s], scale,
                                       outputs[:, start:stop], cotangent[:, start:stop])
                start = stop
        return outputs, cotangent

    def features(self, species: Tensor, pos: Tensor, batch: Tensor):
        """What :meth:`networks` and the forces need for a batch of atoms (n_atoms >= 1).

        Returns the AEVs (n_atoms, F) with atoms grouped by species (the AEV of atom i in row
        ``rank[i]``) and only the features of the species present (the others are zero), their
        :class:`AEVJacobian`, ``rank``, the number of atoms of each species and the first-layer
        weights for those features (:meth:`_first_layers`).
        """
        _, rank, sizes = group_by_species(species, len(self.elements))
        aev_of_present, compact, first_layers = self._first_layers(
            tuple(s for s, n in enumerate(sizes) if n))
        aev, jac = aev_with_jacobian(aev_of_present, species if compact is None else compact[species],
                                     pos.to(self.dtype), batch, rank)
        return aev, jac, rank, sizes, first_layers

    @torch.no_grad()
    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, num_molecules: int) -> tuple[Tensor, Tensor]:
        """Energies (T, num_molecules) Hartree float64 and forces (T, n_atoms, 3) Hartree/Å.

        Args:
            z: (n_atoms,) atomic numbers; pos: (n_atoms, 3) Å; batch: (n_atoms,) molecule index,
            sorted ascending; num_molecules: number of molecules.
        """
        species = self.species(z)
        if species.numel() == 0:
            empty = self.self_energies.new_zeros(self.num_teachers, num_molecules)
            return empty, pos.new_zeros(self.num_teachers, 0, 3)
        aev, jac, rank, sizes, first_layers = self.features(species, pos, batch)
        scale = self.energy_scale  # (T,) Hartree
        outputs, cotangent = self.networks(aev, scale.to(aev.dtype), sizes, first_layers)
        contributions = outputs.index_select(1, rank)  # atom order
        atomic = scale.unsqueeze(1) * contributions.to(torch.float64)
        atomic = atomic + self.self_energies[:, species]
        energies = atomic.new_zeros(self.num_teachers, num_molecules).index_add_(1, batch, atomic)
        return energies, -aev_vjp_full(jac, cotangent)


class TeacherLoop(nn.Module):
    """Teachers without a batched implementation, evaluated one after another."""

    def __init__(self, models: Sequence[AtomisticModel]):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.num_teachers = len(models)

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, num_molecules: int) -> tuple[Tensor, Tensor]:
        """Energies (T, num_molecules) Hartree float64 and forces (T, n_atoms, 3) Hartree/Å."""
        results = [energy_and_forces(m, z, pos, batch, num_molecules) for m in self.members]
        return torch.stack([e.detach() for e, _ in results]), torch.stack([f for _, f in results])


class TeacherEnsemble(nn.Module):
    """All teachers, grouped into batched modules; outputs follow the order of ``models``.

    Args:
        models: the teachers (their weights are frozen here).
        batched: False evaluates every teacher alone (reference and benchmark baseline).
    """

    def __init__(self, models: Sequence[AtomisticModel], batched: bool = True):
        super().__init__()
        for model in models:
            model.eval().requires_grad_(False)
        keys: dict[tuple, list[int]] = {}
        for i, model in enumerate(models):
            plan = _stack_plan(model)
            if batched and isinstance(model, ANIModel) and isinstance(plan, str):
                log.warning("teacher %d is evaluated alone with autograd (TeacherLoop: the same "
                            "labels, slower) and not batched: %s", i, plan)
            key = group_key(model) if batched else ("single", i)
            keys.setdefault(key, []).append(i)
        groups, order = [], []
        for key, members in keys.items():
            chosen = [models[i] for i in members]
            stack = key[0] == "ani" and len(members) > 1
            groups.append(StackedANI(chosen) if stack else TeacherLoop(chosen))
            order += members
        self.groups = nn.ModuleList(groups)
        self.num_teachers = len(models)
        # position of teacher i among the concatenated group outputs
        self.register_buffer("position", torch.argsort(torch.tensor(order)), persistent=False)

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, num_molecules: int) -> tuple[Tensor, Tensor]:
        """Energies (T, num_molecules) Hartree float64 and forces (T, n_atoms, 3) Hartree/Å in
        the order of the teachers given; forces in the dtype of ``pos``."""
        energies, forces = [], []
        for group in self.groups:
            e, f = group(z, pos, batch, num_molecules)
            energies.append(e)
            forces.append(f.to(pos.dtype))
        return torch.cat(energies)[self.position], torch.cat(forces)[self.position]
