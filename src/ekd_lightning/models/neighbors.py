"""Neighbour pairs within a cutoff: of molecules in pure torch, or given from outside.

Atoms of a batch are stored flat: ``pos`` (n_atoms, 3) in Å and ``batch`` (n_atoms,), the
molecule index of each atom, sorted ascending as PyTorch Geometric produces it. Without given
pairs a model forms them inside each molecule (:func:`neighbor_pairs`, no periodic boundaries;
what training uses). Periodic systems, and engines with their own neighbour list, give the pairs
with their cell shifts (:class:`Pairs`; :func:`periodic_pairs` computes them with vesin).
"""

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


class Pairs(NamedTuple):
    """A full neighbour list given to a model: each pair in both directions, (i, j, S) and
    (j, i, -S), within at least the model's cutoff (pairs beyond it are dropped).

    Attributes:
        edge_index: (2, n_pairs) long, atoms (i, j) as rows of the batch's ``pos``.
        shifts: (n_pairs, 3) Å, the periodic image offset of j: the pair's vector is
            ``pos[j] - pos[i] + shifts`` (``S @ cell`` for the integer cell shift S).
    """

    edge_index: Tensor
    shifts: Tensor


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


def pair_vectors(pos: Tensor, edge_index: Tensor, shifts: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Vectors r_j - r_i (+ ``shifts``, (n_pairs, 3) Å, for periodic images) (n_pairs, 3) and
    distances (n_pairs,) in Å, differentiable in ``pos``."""
    vec = pos[edge_index[1]] - pos[edge_index[0]]
    if shifts is not None:
        vec = vec + shifts.to(vec.dtype)
    return vec, vec.norm(dim=-1)


def model_pairs(pos: Tensor, batch: Tensor, cutoff: float, pairs: Pairs | None = None
                ) -> tuple[Tensor, Tensor | None]:
    """The pairs a model uses: ``(edge_index (2, n_pairs), shifts (n_pairs, 3) Å or None)``,
    sorted by i. Without ``pairs``: :func:`neighbor_pairs` of each molecule, no shifts. With
    them: those closer than ``cutoff`` Å (in a stable sort by i)."""
    if pairs is None:
        return neighbor_pairs(pos, batch, cutoff), None
    edge_index, shifts = pairs
    with torch.no_grad():
        dist = pair_vectors(pos.detach(), edge_index, shifts)[1]
        keep = torch.nonzero(dist < cutoff).squeeze(1)
        order = keep.index_select(0, torch.sort(edge_index[0].index_select(0, keep), stable=True)[1])
    return edge_index.index_select(1, order), shifts.index_select(0, order)


def first_of_pair(edge_index: Tensor, shifts: Tensor | None) -> Tensor:
    """(n_pairs,) bool: True for one direction of each pair: i < j, and for an atom's own
    periodic image (i == j) the image whose shift is lexicographically positive."""
    first = edge_index[0] < edge_index[1]
    if shifts is None:
        return first
    x, y, z = shifts.unbind(-1)
    positive = (x > 0) | ((x == 0) & ((y > 0) | ((y == 0) & (z > 0))))
    return first | ((edge_index[0] == edge_index[1]) & positive)


def periodic_pairs(pos: Tensor, batch: Tensor, cells: Tensor, pbc: Tensor, cutoff: float) -> Pairs:
    """The full neighbour list (vesin) of a batch of periodic (or partly periodic) systems.

    Args:
        pos: (n_atoms, 3) positions in Å (wrapped into the cell or not).
        batch: (n_atoms,) system index of each atom, sorted ascending.
        cells: (n_systems, 3, 3) cell vectors as rows, Å.
        pbc: (n_systems, 3) bool, periodic along each cell vector.
        cutoff: Å.
    """
    from vesin import NeighborList

    lists = NeighborList(cutoff=float(cutoff), full_list=True)
    counts = torch.bincount(batch, minlength=len(cells)).tolist()
    edges, shifts, start = [], [], 0
    for atoms, cell, periodic in zip(pos.detach().split(counts), cells, pbc, strict=True):
        points = atoms.cpu().double().numpy()
        box = cell.detach().cpu().double().numpy()
        i, j, s = lists.compute(points, box, periodic.cpu().tolist(), quantities="ijS")
        edges.append(np.stack([i, j]).astype(np.int64) + start)
        shifts.append(s.astype(np.float64) @ box)
        start += len(points)
    edge_index = torch.from_numpy(np.concatenate(edges, axis=1)).to(pos.device)
    return Pairs(edge_index, torch.from_numpy(np.concatenate(shifts)).to(pos.device, pos.dtype))
