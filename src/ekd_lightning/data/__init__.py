"""Data: HDF5 readers (ANI-1x release and COMP6 layouts) and the LightningDataModule."""

from .datamodule import EKDDataModule, fit_self_energies, split_indices
from .readers import MoleculeRecord, detect_format, open_h5, read_molecules

__all__ = [
    "EKDDataModule", "MoleculeRecord", "detect_format", "fit_self_energies", "open_h5",
    "read_molecules", "split_indices",
]
