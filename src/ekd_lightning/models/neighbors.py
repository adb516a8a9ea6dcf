"""Neighbour pairs within a cutoff, in pure torch (no torch-cluster needed).

Atoms of a batch are stored flat: ``pos`` (n_atoms, 3) in Å and ``batch`` (n_atoms,), the
molecule index of each atom, sorted ascending as PyTorch Geometric produces it. Pairs are only
formed inside a molecule (no periodic boundaries).
"""

import torch
from torch import Tensor


def _intra_molecule_pairs(batch: Tensor) -> tuple[Tensor, Tensor]:
    """All ordered pairs (i, j), i != j, of atoms in the same molecule; each (n_pairs,)."""
    counts = torch.bincount(batch)
    starts = torch.cumsum(counts, 0) - counts
    per_molecule = counts * counts
    molecule = torch.repeat_interleave(torch.arange(len(counts), device=batch.device), per_molecule)
    first_pair = torch.cumsum(per_molecule, 0) - per_molecule
    local = torch.arange(len(molecule), device=batch.device) - first_pair[molecule]
    n = counts[molecule]
    i = starts[molecule] + torch.div(local, n, rounding_mode="floor")
    j = starts[molecule] + local % n
    keep = i != j
    return i[keep], j[keep]


@torch.no_grad()
def neighbor_pairs(pos: Tensor, batch: Tensor, cutoff: float) -> Tensor:
    """Directed pairs of atoms closer than ``cutoff`` Å within the same molecule.

    Args:
        pos: (n_atoms, 3) coordinates in Å.
        batch: (n_atoms,) molecule index of each atom, sorted ascending.
        cutoff: radius in Å.

    Returns:
        edge_index (2, n_pairs) long tensor of (i, j) rows with both directions present, sorted
        by i. No gradient flows through it: recompute distances from ``pos`` where needed.
    """
    i, j = _intra_molecule_pairs(batch)
    close = (pos[i] - pos[j]).norm(dim=-1) < cutoff
    return torch.stack([i[close], j[close]])


def pair_vectors(pos: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor]:
    """Vectors r_j - r_i (n_pairs, 3) and distances (n_pairs,) in Å, differentiable in ``pos``."""
    vec = pos[edge_index[1]] - pos[edge_index[0]]
    return vec, vec.norm(dim=-1)
