"""A short-range pair repulsion any model can carry: the ZBL screened nuclear repulsion.

A physical prior for MD far from the training data: at a compressed bond or an atomic
collision a network trained on sampled geometries may predict a spurious well (docs/md-stability-results.md);
the Ziegler-Biersack-Littmark universal potential (Ziegler, Biersack & Littmark, *The Stopping
and Range of Ions in Solids*, 1985; LAMMPS ``pair_style zbl``) rises steeply there instead.
As in MACE's ``ZBLBasis`` and metatrain's ZBL, each pair's term is switched off smoothly by the
polynomial envelope of degree ``p`` (Klicpera et al. 2020) at the sum of the two atoms' covalent
radii (ASE's table): it is strongest inside a bond's length and vanishes at equilibrium bond
lengths and beyond, so the network learns the rest. The model's energy is
``E = E_network + sum_pairs E_ZBL(r_ij) * envelope(r_ij / (R_i + R_j))``, Hartree; the prior has
no trained parameter.

Set it in a model config with ``repulsion: zbl`` (absent or null: none), e.g.
``python train.py +model.repulsion=zbl``; in the pipeline that override reaches every model it
trains (teachers of every architecture, students, baselines, oracles), so that every compared
model gets the prior. Exports carry it (:mod:`ekd_lightning.inference.export`).
"""

from collections.abc import Sequence

import torch
from ase.data import covalent_radii
from torch import Tensor, nn

from ..core.units import symbol_to_number

ZBL_COEFFICIENTS = (0.18175, 0.50986, 0.28022, 0.02817)
"""Weights of the universal screening function phi(x) = sum_k c_k exp(-d_k x)."""
ZBL_EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)
"""Decay constants d_k of the universal screening function."""
ZBL_SCREENING_LENGTH = 0.46850
"""Å: a = 0.46850 / (Z_i^0.23 + Z_j^0.23) (0.8854 Bohr radii)."""
COULOMB_HARTREE_ANGSTROM = 0.529177210903
"""e² / (4 pi eps0) in Hartree·Å (one Bohr radius, Å)."""
KNOWN = ("zbl",)
"""Values of a model config's ``repulsion`` key (besides null)."""


def envelope(x: Tensor, p: int) -> Tensor:
    """The smooth cutoff 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2) for x < 1,
    0 beyond: value, first and second derivatives vanish at x = 1."""
    value = (1.0 - (p + 1) * (p + 2) / 2 * x.pow(p) + p * (p + 2) * x.pow(p + 1)
             - p * (p + 1) / 2 * x.pow(p + 2))
    return torch.where(x < 1.0, value, torch.zeros_like(value))


class ZBLRepulsion(nn.Module):
    """ZBL pair repulsion between the atoms of ``elements``, off beyond the sum of covalent radii.

    Args:
        elements: element symbols in the model's species order.
        envelope_power: ``p`` of :func:`envelope` (6, as MACE's ZBL).

    ``cutoff`` (Å) is the largest pair cutoff: a neighbour list must reach it.
    """

    def __init__(self, elements: Sequence[str], envelope_power: int = 6):
        super().__init__()
        numbers = torch.tensor([symbol_to_number(e) for e in elements], dtype=torch.float64)
        radii = torch.tensor([float(covalent_radii[int(z)]) for z in numbers], dtype=torch.float64)
        # rebuilt from the elements: not in state dicts, so weights load with or without the prior
        self.register_buffer("charges", numbers, persistent=False)  # (S,)
        self.register_buffer("pair_cutoffs", radii[:, None] + radii[None, :], persistent=False)  # (S, S) Å
        self.register_buffer("coefficients", torch.tensor(ZBL_COEFFICIENTS, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("exponents", torch.tensor(ZBL_EXPONENTS, dtype=torch.float64),
                             persistent=False)
        self.envelope_power = int(envelope_power)
        self.screening_length = ZBL_SCREENING_LENGTH  # attributes: TorchScript reads no globals
        self.coulomb = COULOMB_HARTREE_ANGSTROM
        self.cutoff = float(self.pair_cutoffs.max())

    def pair_energies(self, species_i: Tensor, species_j: Tensor, distances: Tensor) -> Tensor:
        """E_ZBL(r) * envelope (n_pairs,) float64 Hartree of pairs of species indices at
        ``distances`` (n_pairs,) Å; differentiable in the distances."""
        r = distances.to(torch.float64)
        zi, zj = self.charges[species_i], self.charges[species_j]
        a = self.screening_length / (zi.pow(0.23) + zj.pow(0.23))
        phi = (self.coefficients * torch.exp(-self.exponents * (r / a).unsqueeze(-1))).sum(-1)
        cut = self.pair_cutoffs[species_i, species_j]
        inside = r < cut
        safe_r = torch.where(inside, r, cut)  # no 1/r blow-up (or NaN gradient) outside
        coulomb = self.coulomb * zi * zj / safe_r
        return torch.where(inside, coulomb * phi * envelope(safe_r / cut, self.envelope_power),
                           torch.zeros_like(r))

    def forward(self, species: Tensor, i: Tensor, j: Tensor, vec: Tensor) -> Tensor:
        """Per-atom energies (n_atoms,) float64 Hartree from a full neighbour list (each pair in
        both directions, ``vec`` = r_j - r_i (n_pairs, 3) Å): half of each pair's term goes to
        each atom; their sum is the prior's energy."""
        pair = self.pair_energies(species.index_select(0, i), species.index_select(0, j),
                                  vec.norm(2, -1))
        atomic = torch.zeros(species.shape[0], dtype=torch.float64, device=species.device)
        return atomic.index_add(0, i, 0.5 * pair)


def build_repulsion(kind: str | None, elements: Sequence[str]) -> ZBLRepulsion | None:
    """The prior named by a model config's ``repulsion`` key (None: none)."""
    if kind is None:
        return None
    if kind not in KNOWN:
        from ..core.errors import ConfigError

        raise ConfigError(f"model.repulsion={kind!r} is not a known prior; use one of {list(KNOWN)} "
                          "or null (none)")
    return ZBLRepulsion(elements)
