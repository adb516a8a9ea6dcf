"""ANI atomic environment vectors (AEV, Smith et al., Chem. Sci. 2017) on flat batches.

Atoms are stored flat as PyTorch Geometric produces them: ``species`` (n_atoms,), ``pos``
(n_atoms, 3) in Å and ``batch`` (n_atoms,), the molecule index of each atom, sorted ascending.
No padding is used and nothing loops over atoms or molecules in Python.

The features follow torchani (``torchani.aev.AEVComputer`` with ``ANIRadial`` / ``ANIAngular``
terms and the cosine cutoff) exactly, so that weights and features are interchangeable:

* cosine cutoff ``f_c(r) = 0.5 cos(pi r / R_c) + 0.5``;
* radial term ``0.25 exp(-eta_R (r_ij - R_s)^2) f_c(r_ij)`` (the 0.25 is NeuroChem's);
* angular term ``2 ((1 + cos(acos(0.95 cos theta_ijk) - theta_s)) / 2)^zeta
  exp(-eta_A ((r_ij + r_ik) / 2 - R_s)^2) f_c(r_ij) f_c(r_ik)`` over unordered neighbour pairs
  {j, k} of the centre i (the 0.95 keeps ``acos`` away from +-1, as in NeuroChem/torchani);
* shifts ``R_s = start + (cutoff - start) / n * m`` for m = 0..n-1 and angle sections
  ``theta_s = pi / (2 n_sec) + pi / n_sec * m`` (torchani's ``cover_linearly``);
* layout ``[radial | angular]``: the radial part has one block of ``radial_num_shifts``
  features per neighbour species (species order); the angular part has one block of
  ``angular_num_shifts * angular_num_sections`` features per unordered species pair, blocks in
  ``torch.triu_indices`` order ((0,0), (0,1), ..., (0,S-1), (1,1), ...), and inside a block the
  shift index is the slow one and the section index the fast one.

With 7 species (ANI-2x: H, C, N, O, S, F, Cl) this gives 7*16 + 28*32 = 1008 features.

Speed: the terms are added to the AEV by :class:`_TermScatter`, whose backward and double
backward (force training) are written by hand; values below the smallest normal number of the
dtype (subnormals, < 1.2e-38 in float32) are set to zero (Gaussian tails in :func:`gaussian`,
AEV sums in :func:`flush_subnormal`): they are far below any effect on energies and forces, but
make x86 matrix products and ``exp`` several times slower. ``benchmarks/`` measures all this.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .neighbors import Pairs, first_of_pair, model_pairs, pair_vectors


def _linspace(start: float, stop: float, steps: int) -> list[float]:
    """``steps`` values from ``start`` up to ``stop`` excluded, as torchani computes them."""
    return [start + ((stop - start) / steps) * j for j in range(steps)]


def _as_float32(value: float) -> float:
    """``value`` rounded to float32, as torchani stores eta, zeta and the shifts (buffers)."""
    return float(torch.tensor(value, dtype=torch.float32))


def gaussian(exponent: Tensor) -> Tensor:
    """``exp(exponent)`` for exponents <= 0, with values up to about 1.9e-38 in float32 (about
    e^0.51 times the smallest normal number of the dtype; exponents up to -86.83) set to zero.

    Such exponents (the far tails of the AEV Gaussians) send torch's vectorised CPU ``exp`` down
    a scalar path about 50 times slower, and their values are far below any effect on energies
    or forces; they are clamped before ``exp`` and zeroed after it. In float64 (exponents
    below -707.9) nothing here reaches that range and this is plain ``exp``.
    """
    floor = math.log(torch.finfo(exponent.dtype).tiny) + 0.5  # exp is fast from here on
    zero_below = floor + 0.01  # exponents up to this give zero
    if exponent.device.type == "cpu" and (
        exponent.numel() == 0 or float(exponent.detach().amin()) > zero_below
    ):
        return torch.exp(exponent)  # the common case for the angular Gaussians
    return F.threshold(torch.exp(exponent.clamp(min=floor)), math.exp(zero_below), 0.0)


def cosine_cutoff(distances: Tensor, cutoff: float) -> Tensor:
    """``0.5 cos(pi r / cutoff) + 0.5`` (dimensionless), same shape as ``distances`` (Å)."""
    return 0.5 * torch.cos(distances * (math.pi / cutoff)) + 0.5


def cosine_cutoff_derivative(distances: Tensor, cutoff: float) -> Tensor:
    """d :func:`cosine_cutoff` / d r = ``-0.5 (pi / cutoff) sin(pi r / cutoff)`` (1/Å), same
    shape as ``distances`` (Å)."""
    return -0.5 * (math.pi / cutoff) * torch.sin(distances * (math.pi / cutoff))


def angular_triples(centre: Tensor, num_atoms: int) -> tuple[Tensor, Tensor]:
    """All unordered pairs of neighbours of the same centre, from directed pairs sorted by centre.

    Args:
        centre: (n_pairs,) centre atom of each directed pair, sorted ascending (e.g. row 0 of
            :func:`~ekd_lightning.models.neighbors.neighbor_pairs`).
        num_atoms: number of atoms, so that atoms without neighbours are handled.

    Returns:
        ``(p, q)``, each (n_triples,): indices into the pairs with ``centre[p] == centre[q]`` and
        ``p < q``, so every triple (i; j < k in pair order) appears exactly once. A centre with
        ``c`` neighbours contributes ``c (c - 1) / 2`` triples.
    """
    device = centre.device
    counts = torch.bincount(centre, minlength=num_atoms)
    first = torch.cumsum(counts, 0) - counts
    pair = torch.arange(centre.numel(), device=device)
    local = pair - first[centre]
    # pair p (local position a among c neighbours) is matched with the c - 1 - a later ones
    partners = counts[centre] - 1 - local
    p = torch.repeat_interleave(pair, partners)
    first_triple = torch.cumsum(partners, 0) - partners
    offset = torch.arange(p.numel(), device=device) - first_triple[p]
    return p, p + 1 + offset


def flush_subnormal(values: Tensor, nonnegative: bool = False) -> Tensor:
    """``values`` with entries below the smallest normal number of the dtype in magnitude
    (subnormals, |x| < 1.2e-38 in float32) set to zero: in place for a ``nonnegative`` tensor,
    else a new tensor.

    Subnormal AEV entries (Gaussian tails, high powers of the angular term) and subnormal
    entries of their vector-Jacobian products are far below any effect on energies or forces,
    but matrix products with them run several times slower on x86 CPUs; flushing them keeps the
    network layers at full speed.
    """
    tiny = torch.finfo(values.dtype).tiny
    if nonnegative:
        return F.threshold_(values, tiny, 0.0)
    return F.hardshrink(values, tiny)


_CHUNK = 4096
"""Triples per chunk in :class:`_TermScatter` / :class:`_TermGather` (about 0.5 MB of 32-wide
float32 products: they stay in cache, about twice as fast as one pass over all triples)."""

_FACTOR_CHUNK = 8192
"""Triples per chunk of :meth:`ANIAEV.angular_factors` in :meth:`ANIAEV.forward` when no
autograd graph is built (with one, the extra nodes cost more than the cache saves)."""


def spread_units(values: Tensor, k: int, step: int = 1) -> Tensor:
    """Each of ``values`` (..., n) repeated over k consecutive units, plus ``0, 1, ..., k-1``
    times ``step``: (..., n * k). ``step=1``: the k units a term covers; ``step=0``: repeats."""
    if k == 1:
        return values
    return (values.unsqueeze(-1) + step * torch.arange(k, device=values.device)).flatten(-2)


@dataclass
class TermLayout:
    """Where the AEV terms go, the AEV (n_atoms, out_dim) seen as ``units_per_atom`` units of
    ``width`` features per atom (``width`` divides the radial and angular block widths): a radial
    term (pair i < j) covers consecutive units in the radial block of species[j] of atom i and
    in that of species[i] of atom j, an angular term (triple) consecutive units in the angular
    block of its centre. One entry per unit: the unit's atom (``*_atoms``) and its offset within
    that atom's row (``*_offsets``); radial entries have a leading axis of 2 (atoms i and j)."""

    width: int
    units_per_atom: int
    radial_atoms: Tensor  # (2, n_pairs * radial_features / width)
    radial_offsets: Tensor  # (2, n_pairs * radial_features / width)
    angular_atoms: Tensor  # (n_triples * angular_features / width,)
    angular_offsets: Tensor  # (n_triples * angular_features / width,)

    def units(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Unit indices of the radial (2, ...) and angular (...) entries in an AEV (or a
        cotangent) whose atom i is row ``rows[i]``."""
        return (rows[self.radial_atoms] * self.units_per_atom + self.radial_offsets,
                rows[self.angular_atoms] * self.units_per_atom + self.angular_offsets)


@dataclass
class _Units:
    """Where the AEV terms go. The AEV (n_atoms, out_dim) is seen as ``num_units`` rows
    ("units") of ``width`` features, ``width`` dividing the radial and angular block widths;
    a radial term (pair i < j) covers ``radial_units`` consecutive units in the radial block of
    species[j] of atom i (units ``radial[0]``) and in that of species[i] of atom j
    (``radial[1]``); an angular term (triple) covers ``angular_units`` consecutive units
    (``angular``: one entry per unit, triples major)."""

    width: int
    num_units: int
    radial: Tensor  # (2, n_pairs * radial_units)
    angular: Tensor  # (n_triples * angular_units,)
    angular_units: int

    def doubled(self) -> "_Units":
        """The same layout for the angular terms given twice (two sets of triples, concatenated)."""
        return _Units(self.width, self.num_units, self.radial, self.angular.repeat(2),
                      self.angular_units)


@dataclass
class Neighbourhood:
    """The pairs and triples of a batch (:meth:`ANIAEV.neighbourhood`) and where their terms
    go: pairs i < j within the radial cutoff give the radial terms, triples (centre; j, k), j
    and k within the angular cutoff of the centre, the angular terms. Vectors and distances
    in Å."""

    num_atoms: int
    rows: Tensor  # (n_atoms,) AEV row of each atom
    first: Tensor  # (n_pairs,) atom i of each pair i < j
    second: Tensor  # (n_pairs,) atom j
    vec: Tensor  # (n_pairs, 3) r_j - r_i
    dist: Tensor  # (n_pairs,) |r_j - r_i|
    centre: Tensor  # (n_triples,) centre atom
    neighbours: Tensor  # (2, n_triples) atoms j and k
    vec_j: Tensor  # (n_triples, 3) r_j - r_centre
    vec_k: Tensor  # (n_triples, 3) r_k - r_centre
    d_j: Tensor  # (n_triples,)
    d_k: Tensor  # (n_triples,)
    layout: TermLayout
    units: _Units  # the layout in the rows ``rows``


@dataclass
class AngularDerivatives:
    """Derivatives of the angular factors of :meth:`ANIAEV.angular_factors` by the triple's
    geometry: the angular factor (T, sections) by cos theta_ijk; the radial factor (T, shifts)
    by d_ij and by d_ik (1/Å); and cos theta_ijk by the vectors r_j - r_i and r_k - r_i
    (T, 3), 1/Å. (The 1e-10 clamp of d_ij d_ik, never reached by real atoms, is not derived.)"""

    angular_by_cos: Tensor
    radial_by_d_j: Tensor
    radial_by_d_k: Tensor
    cos_by_vec_j: Tensor
    cos_by_vec_k: Tensor


def _batched(*tensors: Tensor) -> bool:
    """Whether any of ``tensors`` is batched by ``torch.func.vmap`` (e.g. in
    ``autograd.grad(..., is_grads_batched=True)``), where in-place writes are not allowed."""
    is_batched = getattr(torch._C._functorch, "is_batchedtensor", None)
    return is_batched is not None and any(is_batched(t) for t in tensors)


def scatter_terms(radial: Tensor, left: Tensor, right: Tensor, units: _Units,
                  shape: tuple[int, int], nonnegative: bool = True) -> Tensor:
    """The AEV ``shape`` (n_atoms, out_dim) from its terms, without an autograd graph (the
    forward of :class:`_TermScatter`): radial terms (n_pairs, R) added to the units of both
    atoms of each pair, angular terms ``outer(left[t], right[t])`` (flattened, left index slow)
    to the units of each triple, on fresh zeros; subnormal sums flushed (:func:`flush_subnormal`;
    ``nonnegative``: all terms >= 0, flushed in place)."""
    pieces = radial.reshape(-1, units.width)
    if _batched(radial, left, right):  # under vmap (batched gradients): no in-place
        terms = (left.unsqueeze(-1) * right.unsqueeze(-2)).reshape(-1, units.width)
        index = torch.cat([units.radial[0], units.radial[1], units.angular])
        zeros = torch.zeros(units.num_units, units.width, dtype=left.dtype, device=left.device)
        out = zeros.index_add(0, index, torch.cat([pieces, pieces, terms]))
        nonnegative = False  # flush out of place
    else:
        out = left.new_zeros(units.num_units, units.width)
        out.index_add_(0, units.radial[0], pieces)
        out.index_add_(0, units.radial[1], pieces)
        k = units.angular_units
        # in chunks of triples whose products stay in cache (same additions, same order)
        for start in range(0, left.shape[0], _CHUNK):
            stop = start + _CHUNK
            terms = left[start:stop].unsqueeze(-1) * right[start:stop].unsqueeze(-2)
            out.index_add_(0, units.angular[start * k : stop * k], terms.view(-1, units.width))
    return flush_subnormal(out, nonnegative).view(shape)


class _TermScatter(torch.autograd.Function):
    """The AEV from its terms: radial terms (n_pairs, R) added to the units of both atoms of
    each pair and the angular terms ``outer(left[t], right[t])`` (flattened, left index slow)
    added to the units of each triple, on fresh zeros; sums below the smallest normal number
    flushed to zero (:func:`flush_subnormal`; ``nonnegative``: all terms >= 0).

    Forward: the same products and ``index_add_`` calls, in the same order, as written out in
    autograd (the same values). Backward: the transpose :class:`_TermGather` (gathers and small
    batched matrix products instead of broadcast products and reductions over the small last
    dimensions), itself differentiable, so forces can be trained on (double backward).
    """

    @staticmethod
    def forward(ctx, radial: Tensor, left: Tensor, right: Tensor, units: _Units,
                shape: tuple[int, int], nonnegative: bool) -> Tensor:
        ctx.save_for_backward(left, right)
        ctx.units = units
        ctx.radial_shape = radial.shape
        return scatter_terms(radial, left, right, units, shape, nonnegative)

    @staticmethod
    def backward(ctx, grad: Tensor):
        left, right = ctx.saved_tensors
        grad_radial, grad_left, grad_right = _TermGather.apply(
            grad, left, right, ctx.units, ctx.radial_shape
        )
        return grad_radial, grad_left, grad_right, None, None, None


class _TermGather(torch.autograd.Function):
    """The vector-Jacobian product of :class:`_TermScatter`: for a cotangent ``grad`` of the
    AEV, ``grad[units i] + grad[units j]`` per pair, and ``(g[t] @ right[t], left[t] @ g[t])``
    per triple with ``g[t] = grad[units of t].view(L, R)``."""

    @staticmethod
    def forward(ctx, grad: Tensor, left: Tensor, right: Tensor, units: _Units,
                radial_shape: tuple[int, int]):
        flat = grad.reshape(units.num_units, units.width)
        grad_radial = (flat.index_select(0, units.radial[0]) + flat.index_select(0, units.radial[1]))
        k = units.angular_units
        grad_left, grad_right = [], []
        for start in range(0, left.shape[0], _CHUNK):  # gathered rows stay in cache
            stop = start + _CHUNK
            g = flat.index_select(0, units.angular[start * k : stop * k])
            g = g.view(-1, left.shape[1], right.shape[1])
            grad_left.append(torch.bmm(g, right[start:stop].unsqueeze(-1)).squeeze(-1))
            grad_right.append(torch.bmm(left[start:stop].unsqueeze(1), g).squeeze(1))
        if grad_left:
            grad_left, grad_right = torch.cat(grad_left), torch.cat(grad_right)
        else:  # no triples
            grad_left, grad_right = left * 0, right * 0
        ctx.save_for_backward(grad, left, right)
        ctx.units = units
        return grad_radial.view(radial_shape), grad_left, grad_right

    @staticmethod
    def backward(ctx, grad_grad_radial: Tensor, grad_grad_left: Tensor, grad_grad_right: Tensor):
        grad, left, right = ctx.saved_tensors
        units = ctx.units
        # linear in grad: its adjoint scatters the radial cotangents and, per triple,
        # outer(gg_left, right) + outer(left, gg_right)
        d_grad = _TermScatter.apply(
            grad_grad_radial, torch.cat([grad_grad_left, left]),
            torch.cat([right, grad_grad_right]), units.doubled(), tuple(grad.shape), False,
        )
        # d / d left[t, a] = sum_b g[t, a, b] gg_right[t, b]; d / d right = gg_left[t] @ g[t]
        _, d_left, d_right = _TermGather.apply(
            grad, grad_grad_left, grad_grad_right, units, tuple(grad_grad_radial.shape)
        )
        return d_grad, d_left, d_right, None, None


class ANIAEV(nn.Module):
    """ANI atomic environment vectors on a flat batch of molecules.

    Args:
        num_species: number of species S; species indices run over 0..S-1.
        radial_cutoff: radial cutoff R_c in Å.
        radial_eta: radial Gaussian width eta_R in 1/Å².
        radial_start: first radial shift in Å.
        radial_num_shifts: number of radial shifts (features per species block).
        angular_cutoff: angular cutoff in Å (at most ``radial_cutoff``).
        angular_eta: angular Gaussian width eta_A in 1/Å².
        angular_zeta: angular exponent zeta (dimensionless).
        angular_start: first angular radial shift in Å.
        angular_num_shifts: number of angular radial shifts.
        angular_num_sections: number of angle sections theta_s.

    The defaults are ANI-2x's (:meth:`like_2x`).
    """

    radial_shifts: Tensor
    angular_shifts: Tensor
    angular_sections: Tensor
    triu_index: Tensor

    def __init__(
        self,
        num_species: int,
        radial_cutoff: float = 5.1,
        radial_eta: float = 19.7,
        radial_start: float = 0.8,
        radial_num_shifts: int = 16,
        angular_cutoff: float = 3.5,
        angular_eta: float = 12.5,
        angular_zeta: float = 14.1,
        angular_start: float = 0.8,
        angular_num_shifts: int = 8,
        angular_num_sections: int = 4,
    ):
        super().__init__()
        if angular_cutoff > radial_cutoff:
            raise ValueError(
                f"angular_cutoff {angular_cutoff} must not exceed radial_cutoff {radial_cutoff}"
            )
        self.num_species = int(num_species)
        self.radial_cutoff = float(radial_cutoff)
        self.radial_eta = _as_float32(radial_eta)
        self.angular_cutoff = float(angular_cutoff)
        self.angular_eta = _as_float32(angular_eta)
        self.angular_zeta = _as_float32(angular_zeta)
        self.config = {
            "radial_cutoff": self.radial_cutoff, "radial_eta": self.radial_eta,
            "radial_start": float(radial_start), "radial_num_shifts": int(radial_num_shifts),
            "angular_cutoff": self.angular_cutoff, "angular_eta": self.angular_eta,
            "angular_zeta": self.angular_zeta, "angular_start": float(angular_start),
            "angular_num_shifts": int(angular_num_shifts),
            "angular_num_sections": int(angular_num_sections),
        }
        radial_shifts = _linspace(radial_start, radial_cutoff, radial_num_shifts)
        angular_shifts = _linspace(angular_start, angular_cutoff, angular_num_shifts)
        half_section = math.pi / angular_num_sections / 2
        sections = _linspace(half_section, math.pi + half_section, angular_num_sections)
        # constants: float32 values (as torchani stores them) kept in float64 buffers and cast
        # to the dtype of the coordinates in forward
        for name, values in (
            ("radial_shifts", radial_shifts),
            ("angular_shifts", angular_shifts),
            ("angular_sections", sections),
        ):
            buffer = torch.tensor(values, dtype=torch.float32).to(torch.float64)
            self.register_buffer(name, buffer, persistent=False)
        # unordered species pair (a, b) -> angular block, torch.triu_indices order
        first, second = torch.triu_indices(num_species, num_species)
        triu = torch.zeros(num_species, num_species, dtype=torch.long)
        triu[first, second] = torch.arange(first.numel())
        triu[second, first] = torch.arange(first.numel())
        self.register_buffer("triu_index", triu, persistent=False)
        self.num_species_pairs = num_species * (num_species + 1) // 2
        self.radial_features = int(radial_num_shifts)
        self.angular_features = int(angular_num_shifts) * int(angular_num_sections)
        self.radial_length = self.num_species * self.radial_features
        self.angular_length = self.num_species_pairs * self.angular_features
        self.out_dim = self.radial_length + self.angular_length
        self._restricted: dict[tuple, tuple[ANIAEV, Tensor, Tensor]] = {}

    @classmethod
    def like_2x(cls, num_species: int = 7) -> "ANIAEV":
        """AEV with the ANI-2x constants (1008 features for the 7 ANI-2x species)."""
        return cls(num_species)

    @classmethod
    def like_1x(cls, num_species: int = 4) -> "ANIAEV":
        """AEV with the ANI-1x constants (384 features for H, C, N, O)."""
        return cls(
            num_species, radial_cutoff=5.2, radial_eta=16.0, radial_start=0.9,
            radial_num_shifts=16, angular_cutoff=3.5, angular_eta=8.0, angular_zeta=32.0,
            angular_start=0.9, angular_num_shifts=4, angular_num_sections=8,
        )

    def extra_repr(self) -> str:
        return f"num_species={self.num_species}, out_dim={self.out_dim}, " + ", ".join(
            f"{k}={v}" for k, v in self.config.items()
        )

    def restricted(self, present: tuple[int, ...]) -> tuple["ANIAEV", Tensor | None, Tensor | None]:
        """This AEV over the species ``present`` only, for batches without the others.

        The features of absent species are zero, so the networks need not multiply them: the
        7-element ANI-2x AEV has 1008 features, of which 384 can be nonzero on molecules of
        H, C, N and O only (ANI-1ccx, COMP6).

        Args:
            present: species indices, ascending.

        Returns:
            the restricted AEV (the same constants over ``len(present)`` species); ``compact``
            (num_species,): the restricted species index of each species (-1 if absent); and
            ``columns`` (restricted out_dim,): the column of each restricted feature in this
            AEV, ascending, so that ``restricted(compact[species], ...)`` equals
            ``self(species, ...)[:, columns]``. Cached per species set and device. With every
            species present: ``(self, None, None)``, nothing to restrict.
        """
        if len(present) == self.num_species:
            return self, None, None
        device = self.triu_index.device
        key = (tuple(present), device)
        if key not in self._restricted:
            index = torch.tensor(present, dtype=torch.long, device=device)
            aev = ANIAEV(len(present), **self.config).to(device)
            compact = torch.full((self.num_species,), -1, dtype=torch.long, device=device)
            compact[index] = torch.arange(len(present), device=device)
            a, b = torch.triu_indices(len(present), len(present), device=device)
            blocks = self.triu_index[index[a], index[b]]
            columns = torch.cat([
                spread_units(index * self.radial_features, self.radial_features),
                spread_units(self.radial_length + blocks * self.angular_features,
                             self.angular_features),
            ])
            self._restricted[key] = (aev, compact, columns)
        return self._restricted[key]

    def radial_terms(self, distances: Tensor, derivative: bool = False
                     ) -> Tensor | tuple[Tensor, Tensor]:
        """Radial terms (n_pairs, radial_num_shifts), dimensionless, of distances (n_pairs,) Å;
        with ``derivative``, also their derivative by the distance (n_pairs, shifts), 1/Å."""
        diff = distances.unsqueeze(-1) - self.radial_shifts.to(distances.dtype)
        gauss = gaussian(-self.radial_eta * diff**2)
        terms = 0.25 * gauss * cosine_cutoff(distances, self.radial_cutoff).unsqueeze(-1)
        if not derivative:
            return terms
        slope = cosine_cutoff_derivative(distances, self.radial_cutoff).unsqueeze(-1)
        return terms, 0.25 * gauss * slope - 2.0 * self.radial_eta * diff * terms

    def angular_factors(
        self, vec_j: Tensor, vec_k: Tensor, d_j: Tensor, d_k: Tensor, derivatives: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, AngularDerivatives]:
        """The two factors of the angular terms: radial (n_triples, shifts) and angular
        (n_triples, sections), dimensionless; the terms are their outer product. With
        ``derivatives``, also their :class:`AngularDerivatives` (analytic, no autograd).

        Args:
            vec_j, vec_k: (n_triples, 3) vectors from the centre to the two neighbours, Å.
            d_j, d_k: (n_triples,) their lengths, Å.
        """
        dtype = vec_j.dtype
        denom = torch.clamp(d_j * d_k, min=1e-10)
        cos_angle = (vec_j * vec_k).sum(-1) / denom
        # cos(acos(x) - theta_s) = x cos(theta_s) + sqrt(1 - x^2) sin(theta_s), x = 0.95 cos
        x = (0.95 * cos_angle).unsqueeze(-1)
        sections = self.angular_sections.to(dtype)
        cos_s, sin_s = torch.cos(sections), torch.sin(sections)
        along = x * cos_s
        root = torch.sqrt(1.0 - x * x)
        base = (1.0 + (along + root * sin_s)) * 0.5
        angular = 2.0 * base**self.angular_zeta  # (T, sections)
        # (operations in this order: autograd then sums the gradients of d_j and d_k in the
        # order it always has, bitwise the same forces)
        mean = (0.5 * (d_j + d_k)).unsqueeze(-1)
        cut_j = cosine_cutoff(d_j, self.angular_cutoff)
        cut_k = cosine_cutoff(d_k, self.angular_cutoff)
        cut = cut_j * cut_k
        diff = mean - self.angular_shifts.to(dtype)
        gauss = gaussian(-self.angular_eta * diff**2)
        radial = gauss * cut.unsqueeze(-1)  # (T, shifts)
        if not derivatives:
            return radial, angular
        shared = self.angular_eta * diff * radial  # d gauss / d d_j = d / d d_k
        c = cos_angle.unsqueeze(-1)
        return radial, angular, AngularDerivatives(
            angular_by_cos=(self.angular_zeta * 0.95) * base ** (self.angular_zeta - 1.0)
            * (cos_s - x / root * sin_s),
            radial_by_d_j=gauss * (cut_k * cosine_cutoff_derivative(d_j, self.angular_cutoff)
                                   ).unsqueeze(-1) - shared,
            radial_by_d_k=gauss * (cut_j * cosine_cutoff_derivative(d_k, self.angular_cutoff)
                                   ).unsqueeze(-1) - shared,
            cos_by_vec_j=vec_k / denom.unsqueeze(-1) - c * (vec_j / d_j.unsqueeze(-1))
            / d_j.unsqueeze(-1),
            cos_by_vec_k=vec_j / denom.unsqueeze(-1) - c * (vec_k / d_k.unsqueeze(-1))
            / d_k.unsqueeze(-1),
        )

    def angular_terms(self, vec_j: Tensor, vec_k: Tensor, d_j: Tensor, d_k: Tensor) -> Tensor:
        """Angular terms (n_triples, shifts * sections), dimensionless: the outer product of
        :meth:`angular_factors` (same arguments), shift index slow, section index fast."""
        radial, angular = self.angular_factors(vec_j, vec_k, d_j, d_k)
        terms = radial.unsqueeze(-1) * angular.unsqueeze(-2)  # (T, shifts, sections)
        return terms.flatten(1)

    def term_layout(self, species: Tensor, first: Tensor, second: Tensor, centre: Tensor,
                    block: Tensor) -> TermLayout:
        """Where the terms of the pairs ``first`` < ``second`` (n_pairs,) and of the triples
        with ``centre`` and species-pair ``block`` (n_triples,) go in the AEV (see
        :class:`TermLayout`); each term covers k consecutive units of ``width`` features."""
        width = math.gcd(self.radial_features, self.angular_features)
        k_radial, k_angular = self.radial_features // width, self.angular_features // width
        return TermLayout(
            width=width, units_per_atom=self.out_dim // width,
            radial_atoms=spread_units(torch.stack([first, second]), k_radial, 0),
            radial_offsets=spread_units(
                torch.stack([species[second], species[first]]) * k_radial, k_radial),
            angular_atoms=spread_units(centre, k_angular, 0),
            angular_offsets=spread_units(self.radial_length // width + block * k_angular, k_angular),
        )

    def neighbourhood(self, species: Tensor, pos: Tensor, batch: Tensor,
                      rank: Tensor | None = None, pairs: Pairs | None = None) -> Neighbourhood:
        """The pairs and triples of a batch, their geometry (differentiable in ``pos``) and
        where their terms go in the AEV (arguments as :meth:`forward`)."""
        n_atoms = species.shape[0]
        rows = torch.arange(n_atoms, device=species.device) if rank is None else rank
        # radial part: each pair i < j adds its terms to block species[j] of atom i and to
        # block species[i] of atom j (the pairs come in both directions; half the work)
        # (gathers by index_select: faster than boolean / advanced indexing, both ways)
        # (periodic images: pair (i, j, S) is kept, (j, i, -S) dropped; see first_of_pair)
        edge_index, shifts = model_pairs(pos.detach(), batch, self.radial_cutoff, pairs)
        vec, dist = pair_vectors(pos, edge_index, shifts)
        centre, neighbour = edge_index[0], edge_index[1]
        half = torch.nonzero(first_of_pair(edge_index, shifts)).squeeze(1)
        first, second = centre.index_select(0, half), neighbour.index_select(0, half)

        # angular part: unordered pairs {j, k} of neighbours within the angular cutoff; the
        # directed pairs are needed here, each centre sees all of its neighbours
        close = torch.nonzero(dist.detach() < self.angular_cutoff).squeeze(1)
        a_centre = centre.index_select(0, close)
        a_neighbour = neighbour.index_select(0, close)
        a_vec = vec.index_select(0, close)
        a_dist = dist.index_select(0, close)
        p, q = angular_triples(a_centre, n_atoms)
        j, k = a_neighbour.index_select(0, p), a_neighbour.index_select(0, q)
        block = self.triu_index[species[j], species[k]]
        layout = self.term_layout(species, first, second, a_centre[p], block)
        radial_units, angular_units = layout.units(rows)
        return Neighbourhood(
            num_atoms=n_atoms, rows=rows, first=first, second=second,
            vec=vec.index_select(0, half), dist=dist.index_select(0, half),
            centre=a_centre[p], neighbours=torch.stack([j, k]),
            vec_j=a_vec.index_select(0, p), vec_k=a_vec.index_select(0, q),
            d_j=a_dist.index_select(0, p), d_k=a_dist.index_select(0, q), layout=layout,
            units=_Units(layout.width, n_atoms * layout.units_per_atom, radial_units,
                         angular_units, self.angular_features // layout.width),
        )

    def forward(
        self, species: Tensor, pos: Tensor, batch: Tensor, rank: Tensor | None = None,
        pairs: Pairs | None = None,
    ) -> Tensor:
        """AEVs (n_atoms, out_dim), dimensionless, in the dtype of ``pos``.

        Args:
            species: (n_atoms,) long species index in 0..num_species-1.
            pos: (n_atoms, 3) coordinates in Å; differentiable (twice) with respect to it.
            batch: (n_atoms,) molecule index of each atom, sorted ascending.
            rank: optional (n_atoms,) permutation: the AEV of atom i is written to row
                ``rank[i]`` (e.g. atoms grouped by species for the element networks, without a
                copy); default: row i.
            pairs: a full neighbour list with periodic shifts (:class:`Pairs`); None: every
                pair within each molecule.

        Entries below the smallest normal number of the dtype (subnormals) are zero (see
        :func:`flush_subnormal` and :func:`gaussian`).
        """
        hood = self.neighbourhood(species, pos, batch, rank, pairs)
        radial_terms = self.radial_terms(hood.dist)
        args = (hood.vec_j, hood.vec_k, hood.d_j, hood.d_k)
        if hood.vec_j.requires_grad or hood.d_j.numel() <= _FACTOR_CHUNK:
            left, right = self.angular_factors(*args)
        else:  # no graph to build: in chunks, temporaries stay in cache (the same values)
            pieces = zip(*(a.split(_FACTOR_CHUNK) for a in args), strict=True)
            chunks = [self.angular_factors(*c) for c in pieces]
            left, right = (torch.cat(parts) for parts in zip(*chunks, strict=True))
        # radial terms added to both atoms, outer products of the angular factors added to
        # their centre (the same values, in the same order, as index_add_ of radial_terms and
        # angular_terms into [radial | angular] blocks), subnormal sums flushed; hand-written,
        # differentiable backward
        return _TermScatter.apply(radial_terms, left, right, hood.units,
                                  (hood.num_atoms, self.out_dim), True)
