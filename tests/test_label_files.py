"""Label files store only labelled rows (format version 2) and read back exactly what the dense
version-1 files gave, which still read: on the bundled data, fully and partially labelled,
against a frozen copy of the version-1 writer and reader (``tests/labels_v1.py``)."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from batch_digest import loader_digest
from ekd_lightning.bundled import TRAIN_FILE
from ekd_lightning.core.errors import DataError
from ekd_lightning.data import EKDDataModule, read_molecules
from ekd_lightning.data import labels as labels_module
from ekd_lightning.data.labels import read_label_metadata, read_labels, write_labels
from labels_v1 import read_labels_v1, write_labels_v1

ENERGY = "gfn2_xtb.energy"
TEACHERS = 3


def file_conformations(path: Path, records) -> dict[str, int]:
    with h5py.File(path, "r") as f:
        return {r.key: int(f[r.key]["coordinates"].shape[0]) for r in records}


def label_blocks(records, chosen, seed: int = 0):
    """Random teacher predictions for the conformations ``chosen[m]`` (positions among record
    m's kept conformations), as blocks of at most 40 consecutive ones (as chunks cut them)."""
    rng = np.random.default_rng(seed)
    blocks = []
    for record, positions in zip(records, chosen, strict=True):
        n_atoms = len(record.atomic_numbers)
        for start in range(0, len(positions), 40):
            conf = np.asarray(record.conf_index)[positions[start:start + 40]]
            k = len(conf)
            teacher_forces = rng.normal(0, 0.02, (TEACHERS, k, n_atoms, 3)).astype(np.float32)
            teacher_energy = rng.normal(-40, 1, (TEACHERS, k))
            wide = teacher_forces.astype(np.float64)
            blocks.append((record.key, conf, {
                "forces": wide.mean(0).astype(np.float32), "forces_std": wide.std(0).astype(np.float32),
                "energy": teacher_energy.mean(0), "energy_std": teacher_energy.std(0),
                "teacher_forces": teacher_forces, "teacher_energy": teacher_energy}))
    return blocks


def write_both(tmp_path: Path, records, chosen) -> tuple[Path, Path]:
    """The same labels written by the version-1 writer (dense) and today's (compact)."""
    sizes = file_conformations(TRAIN_FILE, records)
    blocks = label_blocks(records, chosen)
    metadata = {"dataset_path": str(TRAIN_FILE), "energy_key": ENERGY,
                "dataset_sha256": labels_module.cached_sha256(TRAIN_FILE)}
    dense = write_labels_v1(tmp_path / "dense.h5", [(r.key, sizes[r.key], len(r.atomic_numbers))
                                                    for r in records], TEACHERS, blocks, metadata)
    layout = [(r.key, sizes[r.key], np.asarray(r.conf_index)[c], len(r.atomic_numbers))
              for r, c in zip(records, chosen, strict=True)]
    compact = write_labels(tmp_path / "compact.h5", layout, TEACHERS, blocks, metadata)
    return dense, compact


@pytest.fixture(scope="module")
def records():
    return read_molecules(TRAIN_FILE, ENERGY, None, "ani1x")[0]


def every(records):
    return [np.arange(r.num_conformations) for r in records]


def some(records):
    """Every conformation but each third, and none of the second molecule."""
    return [np.zeros(0, np.int64) if m == 1 else np.delete(np.arange(r.num_conformations),
                                                           np.s_[::3])
            for m, r in enumerate(records)]


def assert_same_bytes(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("forces", "force_var"):
            assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape, name
            assert x[name].tobytes() == y[name].tobytes(), name  # NaN bit patterns included


@pytest.mark.parametrize("labelled", [every, some])
def test_compact_file_holds_only_labelled_rows_and_reads_like_the_dense_one(records, labelled,
                                                                           tmp_path):
    chosen = labelled(records)
    dense, compact = write_both(tmp_path, records, chosen)
    with h5py.File(compact, "r") as f:
        for record, positions in zip(records, chosen, strict=True):
            group = f[record.key]
            np.testing.assert_array_equal(group["conf_index"][()], np.asarray(record.conf_index)[positions])
            assert group["forces"].shape == (len(positions), len(record.atomic_numbers), 3)
            assert group["teacher_energy"].shape == (TEACHERS, len(positions))
            assert "teacher_forces" not in group  # only with member_forces
    assert read_label_metadata(compact)["version"] == 2 and read_label_metadata(dense)["version"] == 1
    before = read_labels_v1(dense, records)  # the version-1 code on its own file
    assert_same_bytes(read_labels(compact, records, dataset_path=TRAIN_FILE), before)
    assert_same_bytes(read_labels(dense, records, dataset_path=TRAIN_FILE), before)
    unlabelled = sum(r.num_conformations - len(c) for r, c in zip(records, chosen, strict=True))
    assert sum(int(np.isnan(lab["forces"]).all(axis=(1, 2)).sum()) for lab in before) == unlabelled
    if labelled is some:
        assert compact.stat().st_size < 0.75 * dense.stat().st_size


def batches(labels_file: Path) -> dict:
    """Digests of what a student sees: train (two epochs), val and test batches."""
    dm = EKDDataModule(str(TRAIN_FILE), ENERGY, "gfn2_xtb.forces", "ani1x", batch_size=64,
                       labels=str(labels_file))
    dm.setup("fit")
    torch.manual_seed(0)
    return {name: loader_digest(loader()) for name, loader in (
        ("train0", dm.train_dataloader), ("train1", dm.train_dataloader),
        ("val", dm.val_dataloader), ("test", dm.test_dataloader))}


@pytest.mark.parametrize("labelled", [every, some])
def test_student_batches_are_bit_identical_before_and_after(records, labelled, tmp_path,
                                                          monkeypatch):
    dense, compact = write_both(tmp_path, records, labelled(records))
    after = batches(compact)
    assert after == batches(dense)  # today's reader on an old file
    with monkeypatch.context() as patch:  # the version-1 code on its own file
        patch.setattr(labels_module, "read_labels", lambda path, recs, dataset_path=None:
                      read_labels_v1(path, recs))
        assert after == batches(dense)


def test_writer_refuses_blocks_that_leave_or_miss_rows(records, tmp_path):
    sizes = file_conformations(TRAIN_FILE, records[:2])
    layout = [(r.key, sizes[r.key], np.asarray(r.conf_index), len(r.atomic_numbers))
              for r in records[:2]]
    blocks = label_blocks(records[:2], every(records[:2]))
    with pytest.raises(ValueError, match="never written"):
        write_labels(tmp_path / "labels.h5", layout, TEACHERS, blocks[:-1], {})
    key, conf, arrays = blocks[0]
    layout[0] = (key, sizes[key], np.asarray(conf)[1:], layout[0][3])
    with pytest.raises(ValueError, match=f"'{key}' has no row for conformations"):
        write_labels(tmp_path / "labels.h5", layout, TEACHERS, blocks, {})
    assert list(tmp_path.iterdir()) == []  # atomic: nothing left behind


def test_corrupt_or_foreign_compact_files_are_refused_with_the_fix(records, tmp_path):
    chosen = every(records)
    chosen[0] = chosen[0][:-1]  # the first molecule's last conformation unlabelled
    _, compact = write_both(tmp_path, records, chosen)
    key = records[0].key
    with h5py.File(compact, "a") as f:
        stored = f[key]["conf_index"][()]
        f[key]["conf_index"][:2] = stored[1::-1]  # out of order
    with pytest.raises(DataError, match=rf"compact.h5: group '{key}' has a conf_index that is "
                                        r"not strictly increasing.*re-run distill.py"):
        read_labels(compact, records)
    with h5py.File(compact, "a") as f:
        f[key]["conf_index"][:2] = stored[:2]
        f[key].attrs["n_conformations"] = stored[-1] + 1  # the dataset has one more
    with pytest.raises(DataError, match=rf"compact.h5: group '{key}' labels .* made for another "
                                        "dataset; re-run distill.py on this dataset"):
        read_labels(compact, records)
    with h5py.File(compact, "a") as f:
        f.attrs["version"] = 3
    with pytest.raises(DataError, match="version 3 is newer than this code's 2: update ekd-lightning"):
        read_labels(compact, records)
