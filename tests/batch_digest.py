"""Digests of every batch a data module gives, to compare the packed data module with the
per-conformation PyG graphs it replaced (frozen in ``tests/data/frozen_batches.json``, written
by the old code on the bundled data: ``python tests/batch_digest.py``)."""

import hashlib
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

FIELDS = ("z", "pos", "energy", "forces", "label_forces", "label_force_var", "mol", "conf",
          "batch", "ptr")
FROZEN = Path(__file__).parent / "data" / "frozen_batches.json"


def loader_digest(loader) -> dict:
    """SHA-256 over the fields (dtype, shape, bytes) of every batch, batch sizes and count."""
    digest, sizes = hashlib.sha256(), []
    for batch in loader:
        sizes.append(int(batch.num_graphs))
        for name in FIELDS:
            value = getattr(batch, name, None)
            if value is None:
                digest.update(f"{name}:none;".encode())
                continue
            value = value.contiguous()
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
            digest.update(value.numpy().tobytes())
    return {"sha256": digest.hexdigest(), "batches": len(sizes), "conformations": sum(sizes)}


def write_noisy_labels(path: Path, dataset: Path, energy_key: str, seed: int = 0) -> Path:
    """A deterministic ekd-labels file for ``dataset``: random forces and spreads, every 7th
    conformation of each group unlabelled (NaN), so the student data path drops some."""
    from ekd_lightning.core.hashing import cached_sha256

    rng = np.random.default_rng(seed)
    with h5py.File(dataset, "r") as src, h5py.File(path, "w") as out:
        out.attrs.update(format="ekd-labels", version=1, dataset_path=str(dataset),
                         energy_key=energy_key, dataset_sha256=cached_sha256(dataset))

        def copy(name, obj):
            if isinstance(obj, h5py.Group) and "coordinates" in obj:
                shape = obj["coordinates"].shape
                forces = rng.normal(0, 0.01, shape).astype(np.float32)
                std = rng.uniform(1e-4, 1e-2, shape).astype(np.float32)
                forces[::7] = np.nan
                std[::7] = np.nan
                group = out.create_group(name)
                group["forces"], group["forces_std"] = forces, std

        src.visititems(copy)
    return path


def digests(tmp: Path) -> dict:
    """Digests of the train (two epochs, torch seed 0), val, test and all-conformation loaders
    for the bundled data (as teachers, as a student with labels, with train_fraction) and the
    bundled COMP6 file split by molecule."""
    from ekd_lightning.bundled import TEST_FILE, TRAIN_FILE
    from ekd_lightning.data import EKDDataModule

    train = TRAIN_FILE
    labels = write_noisy_labels(tmp / "labels.h5", train, "gfn2_xtb.energy")
    common = dict(file_format="ani1x", energy_key="gfn2_xtb.energy", force_key="gfn2_xtb.forces")
    cases = {
        "teacher": dict(path=str(train), batch_size=64, **common),
        "student": dict(path=str(train), batch_size=64, labels=str(labels), **common),
        "fraction": dict(path=str(train), batch_size=32, train_fraction=0.5, train_subset_seed=3,
                         seed=5, **common),
        "comp6": dict(path=str(TEST_FILE), energy_key="energies",
                      force_key="forces", file_format="comp6", split_by="molecule", batch_size=16),
    }
    out = {}
    for name, kwargs in cases.items():
        dm = EKDDataModule(**kwargs)
        dm.setup("fit")
        torch.manual_seed(0)
        out[name] = {
            "train_epoch0": loader_digest(dm.train_dataloader()),
            "train_epoch1": loader_digest(dm.train_dataloader()),
            "val": loader_digest(dm.val_dataloader()),
            "test": loader_digest(dm.test_dataloader()),
            "all": loader_digest(dm.all_dataloader(batch_size=50)),
        }
    return out


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = digests(Path(tmp))
    FROZEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(json.dumps(result, indent=1), file=sys.stderr)
