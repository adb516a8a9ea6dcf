"""The packed data module gives the same batches as the per-conformation PyG graphs it replaced."""

import json

import numpy as np
import torch
from torch_geometric.data import Batch, Data

from batch_digest import FROZEN, digests
from ekd_lightning.data import read_molecules
from ekd_lightning.data.packed import PackedConformations, PackedSplit


def test_batches_equal_the_frozen_batches_of_the_old_data_module(tmp_path):
    """Same split, order (two shuffled epochs), values, dtypes and fields as the old module on
    the bundled data, so trained models and the default pipeline's report are unchanged."""
    assert digests(tmp_path) == json.loads(FROZEN.read_text())


def test_collate_equals_pyg_collation_of_single_graphs(ani1x_file):
    """The vectorised gather equals PyG's Batch.from_data_list of one Data per conformation,
    for an arbitrary (unsorted, repeated) index list."""
    records, _ = read_molecules(ani1x_file, "emt.energy", "emt.forces")
    packed = PackedConformations(records)
    index = np.array([300, 3, 41, 40, 3, 159, 0])
    graphs = []
    for g in index:
        m = int(np.searchsorted(packed.record_start, g, side="right")) - 1
        r, c = records[m], g - packed.record_start[m]
        graphs.append(Data(z=torch.from_numpy(r.atomic_numbers),
                           pos=torch.from_numpy(r.coordinates[c]).float(),
                           forces=torch.from_numpy(r.forces[c]).float(),
                           energy=torch.tensor([r.energies[c]], dtype=torch.float64),
                           mol=torch.tensor([m]), conf=torch.tensor([int(r.conf_index[c])])))
    expected, batch = Batch.from_data_list(graphs), packed.collate(index)
    assert batch.num_graphs == len(index)
    for name in ("z", "pos", "forces", "energy", "mol", "conf", "batch", "ptr"):
        assert torch.equal(batch[name], expected[name]), name
    split = PackedSplit(packed, index, gidx=index + 1000)
    items = split.__getitems__([1, 2])
    assert items.gidx.tolist() == [1003, 1041] and items.mol.tolist() == expected.mol[1:3].tolist()


def test_memory_is_the_arrays_not_an_object_per_conformation(ani1x_file):
    records, _ = read_molecules(ani1x_file, "emt.energy", "emt.forces")
    packed = PackedConformations(records)
    n_atoms = int(packed.atom_start[-1])
    # z 1 + pos 12 + forces 12 bytes per atom; energy, mol, conf, atom_count, atom_start 40 per conformation
    assert packed.nbytes <= 25 * n_atoms + 41 * len(packed) + 8 * (len(records) + 1)
