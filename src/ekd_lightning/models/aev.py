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
"""

import math

import torch
from torch import Tensor, nn

from .neighbors import neighbor_pairs, pair_vectors


def _linspace(start: float, stop: float, steps: int) -> list[float]:
    """``steps`` values from ``start`` up to ``stop`` excluded, as torchani computes them."""
    return [start + ((stop - start) / steps) * j for j in range(steps)]


def _as_float32(value: float) -> float:
    """``value`` rounded to float32, as torchani stores eta, zeta and the shifts (buffers)."""
    return float(torch.tensor(value, dtype=torch.float32))


def cosine_cutoff(distances: Tensor, cutoff: float) -> Tensor:
    """``0.5 cos(pi r / cutoff) + 0.5`` (dimensionless), same shape as ``distances`` (Å)."""
    return 0.5 * torch.cos(distances * (math.pi / cutoff)) + 0.5


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

    def radial_terms(self, distances: Tensor) -> Tensor:
        """Radial terms (n_pairs, radial_num_shifts), dimensionless, of distances (n_pairs,) Å."""
        shifts = self.radial_shifts.to(distances.dtype)
        gauss = torch.exp(-self.radial_eta * (distances.unsqueeze(-1) - shifts) ** 2)
        return 0.25 * gauss * cosine_cutoff(distances, self.radial_cutoff).unsqueeze(-1)

    def angular_terms(self, vec_j: Tensor, vec_k: Tensor, d_j: Tensor, d_k: Tensor) -> Tensor:
        """Angular terms (n_triples, shifts * sections), dimensionless.

        Args:
            vec_j, vec_k: (n_triples, 3) vectors from the centre to the two neighbours, Å.
            d_j, d_k: (n_triples,) their lengths, Å.
        """
        dtype = vec_j.dtype
        cos_angle = (vec_j * vec_k).sum(-1) / torch.clamp(d_j * d_k, min=1e-10)
        # cos(acos(x) - theta_s) = x cos(theta_s) + sqrt(1 - x^2) sin(theta_s), x = 0.95 cos
        x = (0.95 * cos_angle).unsqueeze(-1)
        sections = self.angular_sections.to(dtype)
        cos_dev = x * torch.cos(sections) + torch.sqrt(1.0 - x * x) * torch.sin(sections)
        angular = 2.0 * ((1.0 + cos_dev) * 0.5) ** self.angular_zeta  # (T, sections)
        mean = (0.5 * (d_j + d_k)).unsqueeze(-1)
        shifts = self.angular_shifts.to(dtype)
        cut = cosine_cutoff(d_j, self.angular_cutoff) * cosine_cutoff(d_k, self.angular_cutoff)
        radial = torch.exp(-self.angular_eta * (mean - shifts) ** 2) * cut.unsqueeze(-1)
        terms = radial.unsqueeze(-1) * angular.unsqueeze(-2)  # (T, shifts, sections)
        return terms.flatten(1)

    def forward(self, species: Tensor, pos: Tensor, batch: Tensor) -> Tensor:
        """AEVs (n_atoms, out_dim), dimensionless, in the dtype of ``pos``.

        Args:
            species: (n_atoms,) long species index in 0..num_species-1.
            pos: (n_atoms, 3) coordinates in Å; differentiable (twice) with respect to it.
            batch: (n_atoms,) molecule index of each atom, sorted ascending.
        """
        n_atoms = species.shape[0]
        s = self.num_species

        # radial part: each pair i < j adds its terms to block species[j] of atom i and to
        # block species[i] of atom j (the pairs come in both directions; half the work)
        edge_index = neighbor_pairs(pos.detach(), batch, self.radial_cutoff)
        vec, dist = pair_vectors(pos, edge_index)
        centre, neighbour = edge_index[0], edge_index[1]
        half = centre < neighbour
        first, second = centre[half], neighbour[half]
        radial_terms = self.radial_terms(dist[half])
        # in-place index_add_ on fresh zeros (no copy); autograd records it as usual
        radial = radial_terms.new_zeros(n_atoms * s, self.radial_features)
        radial.index_add_(0, first * s + species[second], radial_terms)
        radial.index_add_(0, second * s + species[first], radial_terms)

        # angular part: unordered pairs {j, k} of neighbours within the angular cutoff; the
        # directed pairs are needed here, each centre sees all of its neighbours
        close = dist.detach() < self.angular_cutoff
        a_centre = centre[close]
        a_neighbour = neighbour[close]
        a_vec = vec[close]
        a_dist = dist[close]
        p, q = angular_triples(a_centre, n_atoms)
        angular_terms = self.angular_terms(a_vec[p], a_vec[q], a_dist[p], a_dist[q])
        block = self.triu_index[species[a_neighbour[p]], species[a_neighbour[q]]]
        angular = angular_terms.new_zeros(n_atoms * self.num_species_pairs, self.angular_features)
        angular.index_add_(0, a_centre[p] * self.num_species_pairs + block, angular_terms)

        return torch.cat(
            [radial.view(n_atoms, self.radial_length), angular.view(n_atoms, self.angular_length)],
            dim=-1,
        )
