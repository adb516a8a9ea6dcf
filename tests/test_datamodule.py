"""Splits, self-energy fit and PyG batches of the data module."""

import numpy as np
import torch

from ekd_lightning.data import EKDDataModule, fit_self_energies, read_molecules, split_indices


def test_split_is_deterministic_and_disjoint(ani1x_file):
    records, _ = read_molecules(ani1x_file, "emt.energy")
    a = split_indices(records, 0.1, 0.2, seed=3)
    b = split_indices(records, 0.1, 0.2, seed=3)
    c = split_indices(records, 0.1, 0.2, seed=4)
    for name in a:
        assert np.array_equal(a[name], b[name])
    assert not np.array_equal(a["train"], c["train"])
    rows = {tuple(r) for part in a.values() for r in part}
    assert len(rows) == sum(len(p) for p in a.values()) == 320
    assert len(a["test"]) == 64 and len(a["val"]) == 32


def test_split_by_molecule_keeps_molecules_apart(ani1x_file):
    records, _ = read_molecules(ani1x_file, "emt.energy")
    parts = split_indices(records, 0.15, 0.15, seed=0, by="molecule")
    molecules = {name: set(part[:, 0].tolist()) for name, part in parts.items()}
    assert molecules["train"] and molecules["test"]
    assert not molecules["train"] & molecules["test"] and not molecules["train"] & molecules["val"]


def test_self_energies_recover_additive_energies(ani1x_file):
    records, _ = read_molecules(ani1x_file, "emt.energy")
    true = {1: -0.5, 6: -37.8, 7: -54.6, 8: -75.0}
    for r in records:  # replace energies by an exactly additive model
        r.energies[:] = sum(true[z] for z in r.atomic_numbers)
    index = np.concatenate([np.stack([np.full(r.num_conformations, m), np.arange(r.num_conformations)], 1)
                            for m, r in enumerate(records)])
    sae, scale = fit_self_energies(records, index, ["H", "C", "N", "O"])
    assert np.allclose(sae, [-0.5, -37.8, -54.6, -75.0], atol=1e-8)
    assert scale == 1.0  # zero residual: guarded


def test_graphs_and_batches(ani1x_file):
    dm = EKDDataModule(str(ani1x_file), "emt.energy", "emt.forces", batch_size=8, seed=1)
    dm.setup()
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 256, "val": 32, "test": 32}
    batch = next(iter(dm.val_dataloader()))
    assert batch.num_graphs == 8
    assert batch.pos.dtype == torch.float32 and batch.energy.dtype == torch.float64
    assert batch.forces.shape == batch.pos.shape
    record = dm.records[int(batch.mol[0])]
    conf = int(batch.conf[0])
    n = len(record.atomic_numbers)
    assert torch.allclose(batch.pos[:n].double(), torch.from_numpy(record.coordinates[conf]), atol=1e-6)
    assert float(batch.energy[0]) == record.energies[conf]


def test_train_fraction_subsets_training_split_only(ani1x_file):
    full = EKDDataModule(str(ani1x_file), "emt.energy", batch_size=8)
    half = EKDDataModule(str(ani1x_file), "emt.energy", batch_size=8, train_fraction=0.5,
                         train_subset_seed=7)
    full.setup()
    half.setup()
    assert len(half.datasets["train"]) == 128
    assert np.array_equal(full.splits["test"], half.splits["test"])
    assert {tuple(r) for r in half.splits["train"]} <= {tuple(r) for r in full.splits["train"]}


def test_batches_are_pinned_only_for_a_cuda_trainer(ani1x_file):
    from types import SimpleNamespace

    dm = EKDDataModule(str(ani1x_file), "emt.energy", batch_size=8)
    dm.setup()
    assert not dm.train_dataloader().pin_memory  # no trainer attached
    for device, pinned in (("cpu", False), ("cuda", True)):
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        assert dm.train_dataloader().pin_memory is pinned
        assert dm.val_dataloader().pin_memory is pinned
