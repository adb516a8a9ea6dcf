"""Conformations packed into flat arrays, and batches gathered from them by index arithmetic.

A file's usable conformations (records in stored order, each record's kept conformations in
order) get a global index g = 0..N-1. :class:`PackedConformations` holds one array per field
over all of them, atoms of conformation g at rows ``atom_start[g]:atom_start[g + 1]``:

- ``z`` (n_atoms_total,) uint8 atomic numbers, ``pos`` (n_atoms_total, 3) float32 Å;
- ``energy`` (N,) float64 Hartree, ``mol`` (N,) record index, ``conf`` (N,) conformation index
  in the file's group;
- optionally ``forces`` (n_atoms_total, 3) float32 Hartree/Å (reference, -dE/dx),
  ``label_forces`` (n_atoms_total, 3) float32 Hartree/Å and ``label_force_var``
  (n_atoms_total,) float32 (Hartree/Å)² (distilled ensemble mean and variance);
- optionally ``weight`` (N,) float32: a per-conformation loss weight (extra geometries
  weighted by teacher agreement, :mod:`ekd_lightning.distill.augment`).

Memory grows with these arrays (about 30 bytes per atom, 50 with forces), not with a Python
object per conformation. :meth:`PackedConformations.collate` turns a list of global indices
into a PyG ``Batch`` with the fields of the per-conformation graphs it replaces (``z``
int64, ``pos``, ``energy``, ``forces``, ``label_forces``, ``label_force_var``, ``mol``,
``conf``, ``batch``, ``ptr``, ``num_graphs``), with the same dtypes and values, in one
vectorised gather. :class:`PackedSplit` is a map-style dataset over some global indices whose
``__getitems__`` collates a whole batch at once, so a plain ``torch.utils.data.DataLoader``
(same samplers, same shuffling by the torch RNG) batches it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch_geometric.data import Batch

from ..core.torchscript import scriptable_index_select
from .readers import MoleculeRecord

scriptable_index_select()  # after torch-geometric: metatomic stays importable


def _concat(arrays: list[np.ndarray], dtype, width: tuple = ()) -> np.ndarray:
    return np.concatenate([a.reshape(-1, *width) for a in arrays]).astype(dtype, copy=False) \
        if arrays else np.zeros((0, *width), dtype)


class PackedConformations:
    """Every kept conformation of ``records`` in flat arrays (see the module docstring).

    Args:
        records: the molecules, as :func:`~ekd_lightning.data.read_molecules` returns them.
        labels: optional, per record ``{"forces": (n_conf, n_atoms, 3), "force_var":
            (n_conf, n_atoms)}`` as :func:`~ekd_lightning.data.labels.read_labels` returns them.
        weights: optional (N,) loss weight per conformation (batches then carry ``weight``).
    """

    def __init__(self, records: Sequence[MoleculeRecord],
                 labels: Sequence[dict[str, np.ndarray]] | None = None,
                 weights: np.ndarray | None = None):
        n_conf = np.array([r.num_conformations for r in records], dtype=np.int64)
        n_atoms = np.array([len(r.atomic_numbers) for r in records], dtype=np.int64)
        self.record_start = np.concatenate([[0], np.cumsum(n_conf)]).astype(np.int64)
        self.atom_count = np.repeat(n_atoms, n_conf)
        self.atom_start = np.concatenate([[0], np.cumsum(self.atom_count)]).astype(np.int64)
        self.z = _concat([np.tile(r.atomic_numbers, r.num_conformations) for r in records], np.uint8)
        self.pos = _concat([r.coordinates for r in records], np.float32, (3,))
        self.energy = _concat([r.energies for r in records], np.float64)
        self.mol = np.repeat(np.arange(len(records), dtype=np.int64), n_conf)
        self.conf = _concat([np.asarray(r.conf_index) for r in records], np.int64)
        has_forces = bool(records) and records[0].forces is not None
        self.forces = _concat([r.forces for r in records], np.float32, (3,)) if has_forces else None
        self.label_forces = self.label_force_var = None
        if labels is not None:
            self.label_forces = _concat([lab["forces"] for lab in labels], np.float32, (3,))
            self.label_force_var = _concat([lab["force_var"] for lab in labels], np.float32)
        self.weight = None if weights is None else np.asarray(weights, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.energy)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(a.nbytes for a in vars(self).values() if isinstance(a, np.ndarray))

    def global_index(self, rows: np.ndarray) -> np.ndarray:
        """(n, 2) rows of (record, position among its kept conformations) -> (n,) global index."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        return self.record_start[rows[:, 0]] + rows[:, 1]

    def labelled(self) -> np.ndarray:
        """(N,) bool: the conformation's distilled label forces are all finite."""
        if self.label_forces is None:
            raise ValueError("no labels were packed")
        finite = np.isfinite(self.label_forces).all(axis=1)
        if not len(finite):
            return np.zeros(len(self), bool)
        return np.logical_and.reduceat(finite, self.atom_start[:-1]) & (self.atom_count > 0)

    def collate(self, index: np.ndarray, labels: bool = True) -> Batch:
        """A PyG batch of the conformations ``index`` (global indices, in that order).

        ``labels=False`` leaves ``label_forces``/``label_force_var`` out even when packed.
        """
        index = np.asarray(index, dtype=np.int64)
        counts = self.atom_count[index]
        ptr = np.concatenate([[0], np.cumsum(counts)])
        atoms = np.repeat(self.atom_start[index] - ptr[:-1], counts) + np.arange(ptr[-1])
        fields = {
            "z": torch.from_numpy(self.z[atoms].astype(np.int64)),
            "pos": torch.from_numpy(self.pos[atoms]),
            "energy": torch.from_numpy(self.energy[index]),
            "mol": torch.from_numpy(self.mol[index]),
            "conf": torch.from_numpy(self.conf[index]),
        }
        if self.forces is not None:
            fields["forces"] = torch.from_numpy(self.forces[atoms])
        if labels and self.label_forces is not None:
            fields["label_forces"] = torch.from_numpy(self.label_forces[atoms])
            fields["label_force_var"] = torch.from_numpy(self.label_force_var[atoms])
        if self.weight is not None:
            fields["weight"] = torch.from_numpy(self.weight[index])
        fields["batch"] = torch.from_numpy(np.repeat(np.arange(len(index)), counts))
        fields["ptr"] = torch.from_numpy(ptr)
        batch = Batch(**fields)
        batch._num_graphs = len(index)
        return batch


class PackedSplit(Dataset):
    """A map-style dataset of some packed conformations; item i is global index ``index[i]``.

    ``__getitems__`` collates a whole batch in one gather (the DataLoader's ``collate_fn`` is
    then the identity). ``gidx`` (same length as ``index``), when given, is attached to each
    batch as ``batch.gidx``.
    """

    def __init__(self, packed: PackedConformations, index: np.ndarray, labels: bool = True,
                 gidx: np.ndarray | None = None):
        self.packed, self.index, self.labels = packed, np.asarray(index, dtype=np.int64), labels
        self.gidx = None if gidx is None else np.asarray(gidx, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Batch:
        return self.__getitems__([i])

    def __getitems__(self, items: Sequence[int]) -> Batch:
        items = np.asarray(items, dtype=np.int64)
        batch = self.packed.collate(self.index[items], labels=self.labels)
        if self.gidx is not None:
            batch.gidx = torch.from_numpy(self.gidx[items])
        return batch

    def loader(self, batch_size: int, shuffle: bool = False, **kwargs) -> DataLoader:
        """A DataLoader of batches of ``batch_size`` conformations (the last one may be short)."""
        return DataLoader(self, batch_size=batch_size, shuffle=shuffle, collate_fn=_first, **kwargs)


def _first(batch):
    """The DataLoader's collate_fn: ``__getitems__`` already returns the batch."""
    return batch


def records_loader(records: Sequence[MoleculeRecord], batch_size: int) -> DataLoader:
    """Every kept conformation of ``records`` in order, batched (evaluation, prediction)."""
    packed = PackedConformations(records)
    return PackedSplit(packed, np.arange(len(packed))).loader(batch_size)
