"""LightningDataModule over an ANI-1x-layout or COMP6-layout HDF5 file.

The conformations are packed into flat arrays (:mod:`ekd_lightning.data.packed`); each batch is a
PyTorch Geometric ``Batch`` gathered from them, with per-conformation fields
``z`` (n_atoms,) atomic numbers, ``pos`` (n_atoms, 3) Å, ``energy`` (1,) Hartree, optionally
``forces`` (n_atoms, 3) Hartree/Å (reference forces: metrics, and training only in the oracle
stage), ``label_forces`` (n_atoms, 3) and ``label_force_var`` (n_atoms,) (distilled ensemble
mean and variance, student stage), and ``mol``/``conf`` (1,), the record index and the
conformation index in the file, so every prediction can be traced back to its HDF5 group.
Splits are arrays of global conformation indices; the batches (order and values) are those of
the per-conformation PyG graphs this module built before (``tests/test_packed.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader

from ..core.errors import DataError
from ..core.units import implausible_unit, symbol_to_number
from .packed import PackedConformations, PackedSplit
from .readers import MoleculeRecord, read_molecules

log = logging.getLogger(__name__)


def fit_self_energies(
    records: Sequence[MoleculeRecord], index: np.ndarray, elements: Sequence[str]
) -> tuple[np.ndarray, float]:
    """Self atomic energies by least squares, E ≈ Σ_e n_e · SAE_e, over the chosen conformations.

    Args:
        records: the molecules.
        index: (n, 2) rows of (record, conformation) to fit on (the training split).
        elements: element symbols, fixing the order of the result.

    Returns:
        SAE (n_elements,) in Hartree, and the standard deviation (Hartree) of the residual energy
        per atom, used as the models' output scale (1.0 floor-guarded).
    """
    numbers = [symbol_to_number(s) for s in elements]
    counts = np.array([[np.sum(r.atomic_numbers == z) for z in numbers] for r in records], float)
    rows = counts[index[:, 0]]
    starts = np.concatenate([[0], np.cumsum([r.num_conformations for r in records])]).astype(int)
    energies = np.concatenate([r.energies for r in records])[starts[index[:, 0]] + index[:, 1]]
    sae, *_ = np.linalg.lstsq(rows, energies, rcond=None)
    residual_per_atom = (energies - rows @ sae) / rows.sum(axis=1)
    scale = float(residual_per_atom.std())
    return sae, scale if scale > 1e-8 else 1.0


def split_indices(
    records: Sequence[MoleculeRecord], val_fraction: float, test_fraction: float, seed: int,
    by: str = "conformation",
) -> dict[str, np.ndarray]:
    """Deterministic train/val/test split; each value is an (n, 2) array of (record, conf) rows.

    ``by="conformation"`` shuffles all conformations; ``by="molecule"`` keeps each molecule's
    conformations together, so val/test molecules are unseen in training.
    """
    rng = np.random.default_rng(seed)
    if by == "molecule":
        order = rng.permutation(len(records))
        sizes = np.array([records[m].num_conformations for m in order])
        groups = [np.stack([np.full(s, m), np.arange(s)], 1) for m, s in zip(order, sizes, strict=True)]
        cum = np.cumsum(sizes) / sizes.sum()
        test_end = np.searchsorted(cum, test_fraction, side="right") if test_fraction else 0
        val_end = np.searchsorted(cum, test_fraction + val_fraction, side="right") if val_fraction else test_end
        parts = {"test": groups[:test_end], "val": groups[test_end:val_end], "train": groups[val_end:]}
        return {k: np.concatenate(v) if v else np.zeros((0, 2), int) for k, v in parts.items()}
    if by != "conformation":
        raise ValueError(f"split by '{by}': use 'conformation' or 'molecule'")
    everything = np.concatenate(
        [np.stack([np.full(r.num_conformations, m), np.arange(r.num_conformations)], 1)
         for m, r in enumerate(records)]
    )
    everything = everything[rng.permutation(len(everything))]
    n_test = int(round(test_fraction * len(everything)))
    n_val = int(round(val_fraction * len(everything)))
    return {
        "test": everything[:n_test],
        "val": everything[n_test:n_test + n_val],
        "train": everything[n_test + n_val:],
    }


def _with_forces(record: MoleculeRecord, fill: float | None) -> MoleculeRecord:
    """``record`` with reference forces ``fill`` (NaN: none known) where the dataset has
    forces, so that both pack together; None leaves it without."""
    if fill is None:
        return record
    return dataclasses.replace(record, forces=np.full(record.coordinates.shape, fill))


class EKDDataModule(pl.LightningDataModule):
    """Molecules from one HDF5 file, split, with self energies fitted on the training split.

    Args:
        path: HDF5 file (ANI-1x release layout or COMP6 layout).
        energy_key: energy dataset name (Hartree), e.g. ``ccsd(t)_cbs.energy``.
        force_key: reference force dataset (Hartree/Å) or None; used for force metrics, and as
            a training target only by the oracle stage.
        file_format: ``ani1x``, ``comp6`` or ``auto``.
        elements: element filter and the models' element list.
        val_fraction, test_fraction: split sizes; ``split_by``: ``conformation`` or ``molecule``.
        seed: split seed (the same seed gives the same split on every machine).
        batch_size: conformations per batch.
        labels: distilled label file (HDF5 written by distillation) for the student stage.
        train_fraction: use only this random fraction of the training split (teacher diversity).
        forces_are_gradients: the file's force datasets hold dE/dx (True) or -dE/dx (False);
            None: the file's ``forces_convention`` attribute, else gradients for the COMP6
            layout (see :mod:`ekd_lightning.data.readers`). Graphs always hold -dE/dx.
        extra_geometries: optional ``{path, weight, variance_floor}``: teacher-labelled extra
            geometries around the training split (:mod:`ekd_lightning.distill.augment`),
            appended to the training split only (never validation or test), with their teacher
            energies and forces as targets and a per-conformation loss weight
            (:func:`~ekd_lightning.data.extra_geometries.agreement_weights`; the dataset's
            conformations weigh 1). Needs ``labels``.
    """

    def __init__(
        self,
        path: str,
        energy_key: str,
        force_key: str | None = None,
        file_format: str = "auto",
        elements: Sequence[str] = ("H", "C", "N", "O"),
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_by: str = "conformation",
        seed: int = 0,
        batch_size: int = 64,
        labels: str | None = None,
        train_fraction: float = 1.0,
        train_subset_seed: int = 0,
        num_workers: int = 0,
        forces_are_gradients: bool | None = None,
        extra_geometries: dict | None = None,
    ):
        super().__init__()
        self.path = Path(path)
        self.energy_key, self.force_key, self.file_format = energy_key, force_key, file_format
        self.elements = list(elements)
        self.val_fraction, self.test_fraction, self.split_by = val_fraction, test_fraction, split_by
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers
        self.labels_path = labels
        self.forces_are_gradients = forces_are_gradients
        self.extra_geometries = dict(extra_geometries) if extra_geometries else None
        self.n_dataset = 0  # conformations of the dataset file (extra geometries follow them)
        self.train_fraction, self.train_subset_seed = train_fraction, train_subset_seed
        self.records: list[MoleculeRecord] | None = None
        self.splits: dict[str, np.ndarray] = {}
        self.packed: PackedConformations | None = None
        self.datasets: dict[str, PackedSplit] = {}
        self.self_energies: np.ndarray | None = None
        self.energy_scale: float = 1.0

    @property
    def has_reference_forces(self) -> bool:
        return self.force_key is not None

    def setup(self, stage: str | None = None) -> None:
        """Read the file once, split, fit SAE on the training split and pack the conformations."""
        if self.records is not None:
            return
        self.records, _ = read_molecules(
            self.path, self.energy_key, self.force_key, self.file_format, self.elements,
            forces_are_gradients=self.forces_are_gradients,
        )
        self.splits = split_indices(
            self.records, self.val_fraction, self.test_fraction, self.seed, self.split_by
        )
        if self.train_fraction < 1.0:
            train = self.splits["train"]
            rng = np.random.default_rng(self.train_subset_seed)
            n = max(1, int(round(self.train_fraction * len(train))))
            self.splits["train"] = train[np.sort(rng.choice(len(train), n, replace=False))]
        if len(self.splits["train"]) == 0:
            raise DataError(f"{self.path}: the training split is empty")
        self.self_energies, self.energy_scale = fit_self_energies(
            self.records, self.splits["train"], self.elements
        )
        if (unit := implausible_unit(self.elements, self.self_energies)) is not None:
            log.warning("%s: '%s': %s", self.path, self.energy_key, unit)
        labels = self._read_labels()
        records, weights, extra = self.records, None, self._read_extra(labels)
        if extra is not None:
            fill = None if self.force_key is None else np.nan
            records = records + [_with_forces(r, fill) for r in extra.records]
            labels = labels + extra.labels
            weights = np.concatenate([np.ones(sum(r.num_conformations for r in self.records)),
                                      extra.weights])
        self.packed = PackedConformations(records, labels, weights)
        self.n_dataset = sum(r.num_conformations for r in self.records)
        index = {name: self.packed.global_index(rows) for name, rows in self.splits.items()}
        if labels is not None:
            index["train"] = self._drop_unlabelled(index["train"])
        if extra is not None:
            index["train"] = np.concatenate([index["train"],
                                             np.arange(self.n_dataset, len(self.packed))])
        self.datasets = {name: PackedSplit(self.packed, rows) for name, rows in index.items()}
        log.info("split sizes: %s", {k: len(v) for k, v in self.datasets.items()})

    def _read_labels(self) -> list[dict] | None:
        if self.labels_path is None:
            return None
        from .labels import read_labels

        return read_labels(self.labels_path, self.records, dataset_path=self.path)

    def _read_extra(self, labels):
        """The extra geometries (with ``weights``, their per-conformation loss weights), or None."""
        if self.extra_geometries is None:
            return None
        from .extra_geometries import agreement_weights, read_extra_geometries

        spec = self.extra_geometries
        if labels is None or "path" not in spec:
            raise DataError(f"{self.path}: data.extra_geometries needs a path and a stage trained "
                            "on distilled labels (stage=student with distill.labels)")
        extra = read_extra_geometries(spec["path"], self.records, self.splits["train"], self.path)
        extra.weights = agreement_weights(extra.force_var, float(spec.get("weight", 1.0)),
                                          float(spec.get("variance_floor", 1.0)))
        log.info("%s: %d extra geometries, loss weights %.3g-%.3g (mean %.3g)", spec["path"],
                 len(extra.weights), extra.weights.min(initial=np.inf),
                 extra.weights.max(initial=0.0), extra.weights.mean() if len(extra.weights) else 0.0)
        return extra

    def _drop_unlabelled(self, index: np.ndarray) -> np.ndarray:
        """The global indices ``index`` without the conformations that have no distilled label."""
        kept = index[self.packed.labelled()[index]]
        if len(kept) < len(index):
            log.warning("%d training conformations have no distilled label and are skipped",
                        len(index) - len(kept))
        return kept

    def _pin_memory(self) -> bool:
        """Batches in pinned host memory (faster, asynchronous copies to the device) when the
        attached trainer runs on a CUDA GPU."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return self.datasets[split].loader(
            self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=self._pin_memory(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.all_dataloader()

    def split_records(self, split: str) -> list[MoleculeRecord]:
        """The molecules of one split (``train``, ``val``, ``test``), each holding only its
        conformations of that split (``conf_index`` still points into the file), e.g. to
        evaluate on the held-out conformations with :mod:`ekd_lightning.analysis.evaluate`."""
        rows = self.splits[split]
        records = []
        for m in np.unique(rows[:, 0]):
            record, confs = self.records[m], np.sort(rows[rows[:, 0] == m, 1])
            records.append(MoleculeRecord(
                key=record.key, atomic_numbers=record.atomic_numbers,
                coordinates=record.coordinates[confs], energies=record.energies[confs],
                forces=None if record.forces is None else record.forces[confs],
                conf_index=record.conf_index[confs],
            ))
        return records

    def all_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Every conformation of the file in stored order, without distilled labels."""
        split = PackedSplit(self.packed, np.arange(self.n_dataset), labels=False)
        return split.loader(batch_size or self.batch_size)
