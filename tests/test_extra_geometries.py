"""Teacher-labelled extra geometries (issue 12's lever): made around the training split only,
labelled by the teachers (never the reference), weighted by teacher agreement, trained on."""

import h5py
import numpy as np
import pytest
import torch

from conftest import train_tiny, write_label_file
from ekd_lightning.core.errors import DataError
from ekd_lightning.core.units import HARTREE_TO_KCALMOL as KCAL
from ekd_lightning.data import EKDDataModule
from ekd_lightning.distill.augment import agreement_weights, make_extra_geometries
from ekd_lightning.models.base import energy_and_forces
from ekd_lightning.task.checkpoint import load_potential

DATA = {"energy_key": "emt.energy", "force_key": "emt.forces", "file_format": "ani1x",
        "elements": ["H", "C", "N", "O"], "val_fraction": 0.1, "test_fraction": 0.1,
        "split_by": "conformation", "seed": 0, "batch_size": 16}


@pytest.fixture(scope="module")
def teachers(ani1x_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return [str(train_tiny(ani1x_file, root / f"t{s}", "stage=teacher", f"seed={s}",
                           "trainer.max_epochs=1")) for s in (1, 2)]


@pytest.fixture(scope="module")
def extra(ani1x_file, teachers, tmp_path_factory):
    out = tmp_path_factory.mktemp("extra")
    path = make_extra_geometries({"path": str(ani1x_file), **DATA}, teachers, out,
                                 method="cartesian", displacement=0.02, copies=2, seed=3)
    return path


def _datamodule(ani1x_file, labels=None, extra=None):
    dm = EKDDataModule(path=str(ani1x_file), labels=labels, extra_geometries=extra, **DATA)
    dm.setup("fit")
    return dm


def test_geometries_surround_training_conformations_only(ani1x_file, extra, tmp_path, teachers):
    """Mutation caught: sampling around every conformation (val/test included) instead of the
    training split; a displacement of another size; relabelling a cached file."""
    dm = _datamodule(ani1x_file)
    held_out = {(dm.records[m].key, int(dm.records[m].conf_index[p]))
                for split in ("val", "test") for m, p in dm.splits[split]}
    train = {(dm.records[m].key, int(dm.records[m].conf_index[p])) for m, p in dm.splits["train"]}
    by_key = {r.key: r for r in dm.records}
    seen, moves = [], []
    with h5py.File(extra) as f:
        assert f.attrs["format"] == "ekd-extra-geometries" and f.attrs["method"] == "cartesian"
        for key in f:
            sources = f[key]["source_conformation"][()]
            seen += [(key, int(c)) for c in sources]
            moves.append(f[key]["coordinates"][()] - by_key[key].coordinates[sources])
    assert not set(seen) & held_out
    assert set(seen) == train and len(seen) == 2 * len(train)  # copies=2
    assert np.std(np.concatenate([m.ravel() for m in moves])) == pytest.approx(0.02, rel=0.05)
    mtime = extra.stat().st_mtime_ns  # the same settings and teachers: found, not made again
    assert make_extra_geometries({"path": str(ani1x_file), **DATA}, teachers, extra.parent,
                                 method="cartesian", displacement=0.02, copies=2, seed=3) == extra
    assert extra.stat().st_mtime_ns == mtime


def test_md_geometries_move_from_training_conformations(ani1x_file, teachers, tmp_path):
    """``method=md``: a few Langevin steps on the teachers' mean potential from each training
    conformation. Mutation caught: the steps not applied (geometries = the sources), or a
    source outside the training split."""
    dm = _datamodule(ani1x_file)
    train = {(dm.records[m].key, int(dm.records[m].conf_index[p])) for m, p in dm.splits["train"]}
    by_key = {r.key: r for r in dm.records}
    path = make_extra_geometries({"path": str(ani1x_file), **DATA}, teachers, tmp_path,
                                 method="md", temperature=300.0, steps=4, seed=0)
    with h5py.File(path) as f:
        assert f.attrs["method"] == "md" and f.attrs["steps"] == 4
        seen = {(k, int(c)) for k in f for c in f[k]["source_conformation"][()]}
        moves = np.concatenate([np.linalg.norm(f[k]["coordinates"][()] - by_key[k].coordinates[
            f[k]["source_conformation"][()]], axis=-1).ravel() for k in f])
    assert seen == train
    assert 1e-4 < np.median(moves) < 0.2  # 2 fs at 300 K: moved, not far (Å)


def test_labels_are_the_teacher_ensemble_mean_not_the_reference(ani1x_file, extra, teachers):
    """Mutation caught: labelling with the dataset's reference (or one teacher, or the
    gradient instead of the force)."""
    models = [load_potential(t).model for t in teachers]
    with h5py.File(extra) as f:
        key = next(iter(f))
        g = f[key]
        z = torch.as_tensor(g["atomic_numbers"][()])
        pos = torch.as_tensor(g["coordinates"][:4])  # float32: what was labelled
        n, n_atoms = pos.shape[:2]
        batch = torch.arange(n).repeat_interleave(n_atoms)
        preds = [energy_and_forces(m, z.repeat(n), pos.reshape(-1, 3), batch, n) for m in models]
        energy = torch.stack([e.detach() for e, _ in preds]).double()
        forces = torch.stack([fr.detach() for _, fr in preds]).double().reshape(len(models), n, n_atoms, 3)
        np.testing.assert_allclose(g["energy"][:4], energy.mean(0).numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(g["forces"][:4], forces.mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(g["forces_std"][:4], forces.std(0, correction=0).numpy(), atol=1e-5)
        assert float(np.abs(g["forces_std"][()]).max()) > 0  # two different teachers
        labelled, sources = g["forces"][:4], g["source_conformation"][:4]
        displaced = g["coordinates"][:4]
    with h5py.File(ani1x_file) as data:  # the EMT reference near there is another thing
        reference = data[key]["emt.forces"][()][sources]
        assert not np.allclose(data[key]["coordinates"][()][sources], displaced)
    assert np.abs(labelled - reference).mean() > 1e-3


def test_agreement_weights_follow_teacher_agreement():
    """Mutation caught: weights growing with the variance, a missing floor, no normalisation."""
    var = np.array([0.1, 1.0, 4.0, 16.0])  # (kcal/mol/Å)²
    w = agreement_weights(var, weight=0.5, variance_floor=1.0)
    assert w.mean() == pytest.approx(0.5)
    assert w[0] == w[1] > w[2] > w[3]  # floored, then inverse variance
    assert w[2] / w[3] == pytest.approx(4.0)


def test_datamodule_trains_on_the_union_with_weights(ani1x_file, extra, tmp_path):
    """The extra geometries join the training split only, with their teacher energies and
    forces and agreement weights; the dataset's conformations keep weight 1. Mutation caught:
    appending them to validation, weights ignored or inverted, reference energies for them."""
    labels = write_label_file(tmp_path / "labels.h5", ani1x_file, "emt.energy", "emt.forces")
    plain = _datamodule(ani1x_file, labels)
    dm = _datamodule(ani1x_file, labels, {"path": str(extra), "weight": 0.5, "variance_floor": 1e-3})
    n_extra = len(dm.packed) - dm.n_dataset
    assert n_extra == 2 * len(plain.datasets["train"])
    assert len(dm.datasets["train"]) == len(plain.datasets["train"]) + n_extra
    for split in ("val", "test"):
        np.testing.assert_array_equal(dm.datasets[split].index, plain.datasets[split].index)
    batch = dm.packed.collate(np.arange(len(dm.packed)))
    weight = batch.weight.numpy()
    assert (weight[:dm.n_dataset] == 1).all()
    with h5py.File(extra) as f:
        keys = sorted(f)  # read back in file order
        energy = np.concatenate([f[k]["energy"][()] for k in keys])
        spread = np.concatenate([(f[k]["forces_std"][()].astype(float) ** 2).reshape(
            len(f[k]["energy"]), -1).mean(1) for k in keys]) * KCAL**2
    np.testing.assert_allclose(batch.energy.numpy()[dm.n_dataset:], energy)
    assert weight[dm.n_dataset:].mean() == pytest.approx(0.5, rel=1e-5)
    order = np.argsort(spread)  # the better the teachers agree, the more it weighs
    assert weight[dm.n_dataset:][order[0]] > weight[dm.n_dataset:][order[-1]]
    assert np.all(np.diff(weight[dm.n_dataset:][order]) <= 1e-6)
    assert np.isnan(batch.forces.numpy()[batch.ptr[dm.n_dataset]:]).all()  # no reference known


def test_extras_around_held_out_conformations_are_refused(ani1x_file, extra, tmp_path):
    """A file whose geometries were displaced from a validation or held-out conformation would
    leak it into training: refused, naming the file. Mutation caught: no such check."""
    dm = _datamodule(ani1x_file)
    m, p = dm.splits["test"][0]
    record = dm.records[m]
    leaky = tmp_path / "leaky.h5"
    leaky.write_bytes(extra.read_bytes())
    with h5py.File(leaky, "r+") as f:
        if record.key in f:
            f[record.key]["source_conformation"][0] = int(record.conf_index[p])
    labels = write_label_file(tmp_path / "labels.h5", ani1x_file, "emt.energy", "emt.forces")
    with pytest.raises(DataError, match="leaky.h5.*not in this run's training split"):
        _datamodule(ani1x_file, labels, {"path": str(leaky)})


def test_losses_multiply_by_per_conformation_weights():
    """Mutation caught: the energy or force loss term ignoring ``batch.weight``."""
    from torch_geometric.data import Batch

    from ekd_lightning.models.losses import EnergyLoss, ForceLoss

    energy_loss, force_loss = EnergyLoss(), ForceLoss("labels")
    z = torch.tensor([1, 1, 8, 1, 1, 8])
    batch = Batch(z=z, pos=torch.zeros(6, 3), batch=torch.tensor([0, 0, 0, 1, 1, 1]),
                  energy=torch.tensor([0.0, 0.0], dtype=torch.float64),
                  label_forces=torch.zeros(6, 3))
    batch._num_graphs = 2
    energies = torch.tensor([0.0, 0.01], dtype=torch.float64)  # only molecule 1 is wrong
    forces = torch.cat([torch.zeros(3, 3), torch.full((3, 3), 0.01)])
    plain_e, plain_f = energy_loss(energies, forces, batch), force_loss(energies, forces, batch)
    batch.weight = torch.tensor([1.0, 1.0])
    assert energy_loss(energies, forces, batch) == pytest.approx(float(plain_e))
    assert force_loss(energies, forces, batch) == pytest.approx(float(plain_f))
    batch.weight = torch.tensor([1.0, 0.25])
    assert energy_loss(energies, forces, batch) == pytest.approx(0.25 * float(plain_e))
    assert force_loss(energies, forces, batch) == pytest.approx(0.25 * float(plain_f))
    batch.weight = torch.tensor([1.0, 0.0])
    assert float(energy_loss(energies, forces, batch)) == 0.0
    assert float(force_loss(energies, forces, batch)) == 0.0


def test_student_trains_with_extra_geometries(ani1x_file, extra, tmp_path):
    """A real student training (Lightning Trainer) on the union. Mutation caught: the extras
    not reaching the training batches (the weights would equal the plain student's)."""
    labels = write_label_file(tmp_path / "labels.h5", ani1x_file, "emt.energy", "emt.forces")
    common = ("stage=student", f"distill.labels={labels}", "trainer.max_epochs=1")
    plain = train_tiny(ani1x_file, tmp_path / "plain", *common)
    union = train_tiny(ani1x_file, tmp_path / "union", *common,
                       f"+data.extra_geometries={{path: '{extra}', weight: 0.5, variance_floor: 1.0}}")
    a, b = (torch.load(c, weights_only=True)["state_dict"] for c in (plain, union))
    assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)


def test_pipeline_block_reaches_the_students_only(ani1x_file, comp6_file, tmp_path):
    """``+ablation=extra_geometries`` gives the students ``data.extra_geometries`` and leaves
    every other run's config (so its folder in the store) as without it. Mutation caught: the
    block reaching the baseline or the teachers (they would retrain), or not the student."""
    from ekd_lightning.workflow.pipeline import teacher_jobs, variant_jobs
    from test_pipeline import pipeline_cfg

    plain, plain_command = pipeline_cfg(ani1x_file, comp6_file, tmp_path)
    lever, lever_command = pipeline_cfg(ani1x_file, comp6_file, tmp_path, "+ablation=extra_geometries")
    assert lever.pipeline.extra_geometries.method == "cartesian"
    assert "extra_geometries" not in plain.pipeline and "extra_geometries" not in plain.data
    extra = {"path": "x.h5", "weight": 0.5, "variance_floor": 1.0}
    for stage in ("baseline", "oracle"):
        assert [j.run_dir for j in variant_jobs(lever, stage, tmp_path, None, lever_command)] == \
            [j.run_dir for j in variant_jobs(plain, stage, tmp_path, None, plain_command)]
    assert [j.run_dir for j in teacher_jobs(lever, tmp_path, lever_command)] == \
        [j.run_dir for j in teacher_jobs(plain, tmp_path, plain_command)]
    students = variant_jobs(lever, "student", tmp_path, tmp_path / "labels.h5", lever_command, extra)
    assert all(j.cfg["data"]["extra_geometries"] == extra for j in students)
    without = variant_jobs(plain, "student", tmp_path, tmp_path / "labels.h5", plain_command)
    assert all("extra_geometries" not in j.cfg["data"] for j in without)
    assert {j.run_dir for j in students}.isdisjoint(j.run_dir for j in without)
