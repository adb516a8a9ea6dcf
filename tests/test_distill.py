"""Ensemble distillation: labels, batched ensembles, resume, DDP, checks, pretrained teachers and
students trained on the labels (given, or distilled on the fly by train.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import ANI, SCHNET, write_ani1x_file
from ekd_lightning.core.errors import CheckpointError, ConfigError, DataError, LabelMismatchError
from ekd_lightning.data import EKDDataModule, read_molecules
from ekd_lightning.data.labels import read_label_metadata, read_labels
from ekd_lightning.distill import (
    DistillInterrupted,
    StackedANI,
    TeacherEnsemble,
    TeacherLoop,
    distill_labels,
    load_teachers,
    make_job,
    resolve_teachers,
    teachers_override_argv,
)
from ekd_lightning.distill.ensemble import aev_vjp, aev_with_jacobian
from ekd_lightning.inference.teachers import verify_teachers
from ekd_lightning.models.aev import ANIAEV
from ekd_lightning.models.ani import ANIModel
from ekd_lightning.models.base import energy_and_forces
from ekd_lightning.task.checkpoint import load_potential
from ekd_lightning.task.module import PotentialModule
from ekd_lightning.train.training import build_datamodule, build_module, run_training
from test_training import SMALL_ANI, make_cfg

ROOT = Path(__file__).resolve().parents[1]
ENERGY = "emt.energy"
TINY_ANI = {"hidden": {e: [16] for e in "HCNO"}}
TINY_SCHNET = {"hidden_channels": 16, "num_filters": 16, "num_interactions": 1, "num_gaussians": 8}
SIZES = {"batch_size": 16, "chunk_size": 32, "elements": ["H", "C", "N", "O"]}  # 3 chunks of 2 batches


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 molecules x 12 EMT conformations (ANI-1x layout)."""
    return write_ani1x_file(tmp_path_factory.mktemp("distill_data") / "data.h5", n_conf=12, seed=3)


def save_teacher(path: Path, model: dict, seed: int, dm: EKDDataModule) -> str:
    """A checkpoint (untrained weights, the data's self energies) that load_potential accepts."""
    torch.manual_seed(seed)
    module = PotentialModule(model, elements=dm.elements,
                             self_energies=dm.self_energies.tolist(), energy_scale=dm.energy_scale)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def teachers(data, tmp_path_factory) -> dict[str, list[str]]:
    """Three tiny ANI teachers and a tiny SchNet (heterogeneous), plus an exact copy of one."""
    folder = tmp_path_factory.mktemp("teachers")
    dm = EKDDataModule(str(data), ENERGY)
    dm.setup()
    ani = [save_teacher(folder / f"ani{i}.ckpt", {"name": "ani", "_target_": ANI, **TINY_ANI}, i, dm) for i in range(3)]
    schnet = save_teacher(folder / "schnet.ckpt", {"_target_": SCHNET, **TINY_SCHNET}, 7, dm)
    twin = folder / "ani0_copy.ckpt"
    shutil.copy(ani[0], twin)
    return {"mixed": [*ani, schnet], "twins": [ani[0], str(twin)], "other": ani[:2]}


@pytest.fixture(scope="module")
def reference(data, teachers, tmp_path_factory) -> Path:
    """Labels of the mixed ensemble, one process, uninterrupted."""
    out = tmp_path_factory.mktemp("reference") / "labels.h5"
    return distill_labels(make_job(data, ENERGY, out, teachers["mixed"], **SIZES))


def contents(path: Path) -> tuple[dict, dict]:
    """All datasets and root attributes of an HDF5 file."""
    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
        attrs = {k: f.attrs[k] for k in f.attrs}
    return arrays, attrs


def assert_same_labels(a: Path, b: Path, ignore_attrs=()) -> None:
    arrays_a, attrs_a = contents(a)
    arrays_b, attrs_b = contents(b)
    assert arrays_a.keys() == arrays_b.keys()
    for name, value in arrays_a.items():
        np.testing.assert_array_equal(value, arrays_b[name], err_msg=name)
    for key in set(attrs_a) | set(attrs_b):
        if key not in ignore_attrs:
            assert attrs_a.get(key) == attrs_b.get(key), key


def independent_predictions(data: Path, teacher: str) -> dict[tuple[str, int], tuple]:
    """(group, conformation) -> (energy, forces) of one teacher, by its own energy_and_forces."""
    model = load_potential(teacher).model
    dm = EKDDataModule(str(data), ENERGY, batch_size=50)
    dm.setup()
    out = {}
    for batch in dm.all_dataloader():
        energies, forces = energy_and_forces(model, batch.z, batch.pos, batch.batch, batch.num_graphs)
        for i in range(batch.num_graphs):
            atoms = batch.batch == i
            key = (dm.records[int(batch.mol[i])].key, int(batch.conf[i]))
            out[key] = (float(energies[i]), forces[atoms].detach().numpy())
    return out


# ----------------------------------------------------------------------------- labels
def test_labels_are_the_mean_of_independent_teacher_forces(data, teachers, reference, tmp_path):
    ensemble = TeacherEnsemble(load_teachers(resolve_teachers(teachers["mixed"])))
    assert [type(g) for g in ensemble.groups] == [StackedANI, TeacherLoop]
    assert [g.num_teachers for g in ensemble.groups] == [3, 1]

    per_teacher = [independent_predictions(data, t) for t in teachers["mixed"]]
    with_members = distill_labels(make_job(data, ENERGY, tmp_path / "members.h5", teachers["mixed"],
                                           member_forces=True, **SIZES))
    with h5py.File(with_members, "r") as f:  # every conformation labelled: row = conformation
        assert len(f) == 8 and all(np.array_equal(f[k]["conf_index"][()], np.arange(12)) for k in f)
        for key, conf in per_teacher[0]:
            group = f[key]
            energies = np.array([p[(key, conf)][0] for p in per_teacher])
            forces = np.stack([p[(key, conf)][1] for p in per_teacher]).astype(np.float64)
            np.testing.assert_allclose(group["teacher_forces"][:, conf], forces, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(group["teacher_energy"][:, conf], energies, rtol=0, atol=1e-7)
            np.testing.assert_allclose(group["forces"][conf], forces.mean(0), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(group["forces_std"][conf], forces.std(0), rtol=1e-3, atol=1e-6)
            np.testing.assert_allclose(group["energy"][conf], energies.mean(), rtol=0, atol=1e-7)
            np.testing.assert_allclose(group["energy_std"][conf], energies.std(), rtol=1e-3, atol=1e-8)
    # the default file: the same labels without each teacher's forces
    with h5py.File(reference, "r") as f, h5py.File(with_members, "r") as g:
        for key in f:
            assert "teacher_forces" not in f[key] and set(g[key]) - set(f[key]) == {"teacher_forces"}
            for name in f[key]:
                np.testing.assert_array_equal(f[key][name][()], g[key][name][()], err_msg=name)
    meta = read_label_metadata(reference)
    assert [t["path"] for t in meta["teachers"]] == teachers["mixed"]
    # the model config's name, else the model class's
    assert [t["model"] for t in meta["teachers"]] == ["ani"] * 3 + ["SchNetModel"]
    assert all(len(t["sha256"]) == 64 for t in meta["teachers"])
    assert meta["dataset_path"] == str(data.resolve()) and len(meta["dataset_sha256"]) == 64
    assert meta["energy_key"] == ENERGY and meta["units_forces"] == "Hartree/Angstrom"
    assert meta["created"] and meta["code_version"].startswith("ekd-lightning")
    assert not Path(f"{reference}.shards").exists()


def test_identical_teachers_have_zero_spread(data, teachers, tmp_path):
    out = distill_labels(make_job(data, ENERGY, tmp_path / "twins.h5", teachers["twins"],
                                  member_forces=True, **SIZES))
    with h5py.File(out, "r") as f:
        for key in f:
            group = f[key]
            assert np.abs(group["forces_std"][()]).max() < 1e-7
            assert np.abs(group["energy_std"][()]).max() < 1e-9
            np.testing.assert_allclose(group["forces"][()], group["teacher_forces"][0], atol=1e-7)


def test_member_forces_are_kept_only_when_asked_for(data, teachers, reference, tmp_path):
    """A file without each teacher's forces is not reused for a request of them (it names
    member_forces); one with them serves the default request as it is."""
    out = tmp_path / "labels.h5"
    shutil.copy(reference, out)
    with pytest.raises(LabelMismatchError, match="member_forces"):
        distill_labels(make_job(data, ENERGY, out, teachers["mixed"], member_forces=True, **SIZES))
    distill_labels(make_job(data, ENERGY, out, teachers["mixed"], member_forces=True,
                            overwrite=True, **SIZES))
    before = out.stat().st_mtime_ns
    assert distill_labels(make_job(data, ENERGY, out, teachers["mixed"], **SIZES)) == out
    assert out.stat().st_mtime_ns == before
    with h5py.File(out, "r") as f:
        assert all("teacher_forces" in f[key] for key in f)


def test_aev_jacobian_matches_autograd():
    torch.manual_seed(0)
    aev = ANIAEV.like_2x(4).double()
    species = torch.tensor([1, 0, 0, 0, 0, 2, 0, 0, 3, 0, 1, 1])
    pos = torch.randn(12, 3, dtype=torch.float64) * 1.2
    batch = torch.tensor([0] * 5 + [1] * 7)
    features, jac = aev_with_jacobian(aev, species, pos, batch)
    leaf = pos.clone().requires_grad_(True)
    expected = aev(species, leaf, batch)
    assert torch.equal(features, expected.detach())
    cotangents = torch.randn(3, *expected.shape, dtype=torch.float64)
    (grads,) = torch.autograd.grad(expected, leaf, cotangents, is_grads_batched=True)
    radial, angular = cotangents.split([aev.radial_length, aev.angular_length], dim=-1)
    torch.testing.assert_close(aev_vjp(jac, radial, angular), grads, rtol=1e-9, atol=1e-12)
    rank = torch.randperm(12)  # cotangents stored in another atom order
    moved = torch.empty_like(cotangents).index_copy_(1, rank, cotangents)
    radial, angular = moved.split([aev.radial_length, aev.angular_length], dim=-1)
    torch.testing.assert_close(aev_vjp(jac, radial, angular, rank), grads, rtol=1e-9, atol=1e-12)


def test_activations_batched_by_rule_and_others_by_autograd_with_a_warning(caplog):
    """StackedANI takes the activation's derivative from models.ani.activation_backward (CELU
    of any alpha); a teacher whose activation has no rule there is evaluated alone with
    autograd, with a warning naming it, and every teacher's forces equal the plain loop's."""
    import logging

    from ase.build import molecule

    torch.manual_seed(0)
    models = []
    for _ in range(3):
        model = ANIModel(hidden={e: [16, 8] for e in "HCNO"}, activation_alpha=0.5).double()
        model.set_energy_statistics([-0.5, -38.0, -54.6, -75.0], 0.05)
        models.append(model)
    for net in models[2].networks.values():  # the third teacher: Softplus, no rule
        for i, layer in enumerate(net):
            if isinstance(layer, torch.nn.CELU):
                net[i] = torch.nn.Softplus()
    with caplog.at_level(logging.WARNING, logger="ekd_lightning.distill.ensemble"):
        batched = TeacherEnsemble(models)
    assert [type(g) for g in batched.groups] == [StackedANI, TeacherLoop]
    assert "teacher 2" in caplog.text and "Softplus" in caplog.text
    mols = [molecule(n) for n in ("CH3CH2OH", "CH3CONH2")]
    z = torch.tensor(np.concatenate([m.numbers for m in mols]))
    pos = torch.tensor(np.concatenate([m.positions for m in mols]))
    batch = torch.repeat_interleave(torch.arange(len(mols)), torch.tensor([len(m) for m in mols]))
    energies, forces = batched(z, pos, batch, len(mols))
    expected_energies, expected_forces = TeacherEnsemble(models, batched=False)(z, pos, batch, 2)
    torch.testing.assert_close(energies, expected_energies, rtol=0, atol=1e-10)
    torch.testing.assert_close(forces, expected_forces, rtol=0, atol=1e-10)


def test_batched_ani2x_teachers_equal_the_loop_with_and_without_absent_elements():
    from ase.build import molecule

    torch.manual_seed(0)
    elements = ("H", "C", "N", "O", "S", "F", "Cl")
    models = []
    for _ in range(3):
        model = ANIModel(elements).double()
        model.set_energy_statistics([-0.5 - i for i in range(len(elements))], 0.02)
        models.append(model)
    batched, loop = TeacherEnsemble(models), TeacherEnsemble(models, batched=False)
    assert [type(g) for g in batched.groups] == [StackedANI]
    for names in (("CH3CH2OH", "CH3CONH2", "H2O"), ("CH3CONH2", "CH3SH", "CF4", "CH3Cl")):
        mols = [molecule(n) for n in names]
        z = torch.tensor(np.concatenate([m.numbers for m in mols]))
        pos = torch.tensor(np.concatenate([m.positions for m in mols]))
        batch = torch.repeat_interleave(torch.arange(len(mols)), torch.tensor([len(m) for m in mols]))
        energies, forces = batched(z, pos, batch, len(mols))
        expected_energies, expected_forces = loop(z, pos, batch, len(mols))
        torch.testing.assert_close(energies, expected_energies, rtol=0, atol=1e-10)
        torch.testing.assert_close(forces, expected_forces, rtol=0, atol=1e-9)
    # the H, C, N, O batch used only the features of those four elements
    assert [key[0] for key in batched.groups[0]._restricted] == [(0, 1, 2, 3)]


def test_unlabelled_conformations_take_no_rows(data, teachers, tmp_path):
    """Conformations with a NaN energy are not labelled and get no row; the others' rows hold
    the teachers' mean, found through conf_index."""
    partial = tmp_path / "partial.h5"
    shutil.copy(data, partial)
    with h5py.File(partial, "a") as f:
        for key, missing in {"CH4": [0, 5], "H2O": [11], "NH3": list(range(12))}.items():
            energy = f[key][ENERGY][()]
            energy[missing] = np.nan
            f[key][ENERGY][...] = energy
    out = distill_labels(make_job(partial, ENERGY, tmp_path / "labels.h5", teachers["other"], **SIZES))
    per_teacher = [independent_predictions(partial, t) for t in teachers["other"]]
    with h5py.File(out, "r") as f:
        assert "NH3" not in f and f["CH4"].attrs["n_conformations"] == 12
        np.testing.assert_array_equal(f["CH4"]["conf_index"][()], [1, 2, 3, 4, 6, 7, 8, 9, 10, 11])
        np.testing.assert_array_equal(f["H2O"]["conf_index"][()], np.arange(11))
        assert f["CH4"]["forces"].shape == (10, 5, 3) and f["CH4"]["teacher_energy"].shape == (2, 10)
        for key, conf in per_teacher[0]:
            row = int(np.searchsorted(f[key]["conf_index"][()], conf))
            energies = [p[(key, conf)][0] for p in per_teacher]
            np.testing.assert_allclose(f[key]["energy"][row], np.mean(energies), rtol=0, atol=1e-7)


def test_dense_file_of_the_same_run_is_read_not_relabelled(data, teachers, reference, tmp_path,
                                                           caplog):
    """A version-1 (dense) file left by the old code for the same run is current: a rerun keeps
    it, with a warning, and it reads to the very bytes of the compact file."""
    import logging

    from labels_v1 import fingerprint_v1, write_labels_v1

    blocks, layout = [], []
    with h5py.File(reference, "r") as f:
        for key in f:
            group = f[key]
            layout.append((key, int(group.attrs["n_conformations"]), group["forces"].shape[1]))
            arrays = {name: group[name][()] for name in group if name != "conf_index"}
            arrays["teacher_forces"] = np.stack([arrays["forces"]] * 4)  # v1 always had them
            blocks.append((key, group["conf_index"][()], arrays))
        attrs = dict(f.attrs)
    dense = write_labels_v1(tmp_path / "dense.h5", layout, 4, blocks, {})
    with h5py.File(dense, "a") as f:  # the old code's root attributes and run fingerprint
        f.attrs.update({k: v for k, v in attrs.items() if k not in ("version", "identity_version")})
        f.attrs["fingerprint"] = fingerprint_v1(read_label_metadata(reference))
    stamp = dense.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="ekd_lightning.distill.run"):
        assert distill_labels(make_job(data, ENERGY, dense, teachers["mixed"], **SIZES)) == dense
    assert dense.stat().st_mtime_ns == stamp and "dense version-1 layout" in caplog.text
    records, _ = read_molecules(data, ENERGY)
    for old, new in zip(read_labels(dense, records, dataset_path=data),
                        read_labels(reference, records, dataset_path=data), strict=True):
        assert all(old[k].tobytes() == new[k].tobytes() for k in ("forces", "force_var"))


# ----------------------------------------------------------------------------- resume and DDP
def test_kill_and_resume_gives_the_same_file(data, teachers, reference, tmp_path):
    out = tmp_path / "labels.h5"
    with pytest.raises(DistillInterrupted):
        distill_labels(make_job(data, ENERGY, out, teachers["mixed"], stop_after_chunks=2, **SIZES))
    shards = tmp_path / "labels.h5.shards"
    assert not out.exists() and len(list(shards.glob("chunk-*.h5"))) == 2
    created = json.loads((shards / "manifest.json").read_text())["created"]
    # other arguments must not mix with these shards
    with pytest.raises(LabelMismatchError, match="differs in: teachers"):
        distill_labels(make_job(data, ENERGY, out, teachers["other"], **SIZES))
    distill_labels(make_job(data, ENERGY, out, teachers["mixed"], **SIZES))
    assert not shards.exists()
    assert_same_labels(out, reference, ignore_attrs=("created",))
    assert read_label_metadata(out)["created"] == created


def _distill_cli(tmp_path: Path, data: Path, teachers: list[str], out: Path, *extra: str):
    """Run distill.py in a subprocess (needed for DDP: Lightning re-runs the script per rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    listed = [f"teachers=[{','.join(teachers)}]"] if teachers else []
    result = subprocess.run(
        [sys.executable, str(ROOT / "distill.py"), f"data.path={data}", f"data.energy_key={ENERGY}",
         "data.force_key=null", *listed, f"out={out}",
         f"batch_size={SIZES['batch_size']}", f"chunk_size={SIZES['chunk_size']}",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'hydra'}", *extra],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _shard_ranks(shards: Path) -> dict[str, int]:
    ranks = {}
    for shard in sorted(shards.glob("chunk-*.h5")):
        with h5py.File(shard, "r") as f:
            ranks[shard.name] = int(f.attrs["rank"])
    return ranks


DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "keep_shards=true")


def test_ddp_two_processes_equal_one_process(data, teachers, reference, tmp_path):
    folder = tmp_path / "teachers"  # the same teachers, found by teachers.dir
    folder.mkdir()
    for path in teachers["mixed"]:
        shutil.copy(path, folder)
    out = tmp_path / "ddp.h5"
    _distill_cli(tmp_path, data, [], out, f"teachers.dir={folder}", *DDP)
    assert _shard_ranks(tmp_path / "ddp.h5.shards") == {
        "chunk-000000.h5": 0, "chunk-000001.h5": 1, "chunk-000002.h5": 0}
    assert_same_labels(out, reference, ignore_attrs=("created", "teachers"))
    recorded = read_label_metadata(out)["teachers"]
    assert [t["path"] for t in recorded] == [str(folder / Path(p).name) for p in teachers["mixed"]]
    assert [t["sha256"] for t in recorded] == [t["sha256"] for t in read_label_metadata(reference)["teachers"]]


def test_resume_with_another_number_of_processes(data, teachers, reference, tmp_path):
    # one process killed after two chunks, finished by two DDP processes: the only pending chunk
    # goes to rank 0, rank 1 gets a padding conformation that is not written
    out = tmp_path / "labels.h5"
    with pytest.raises(DistillInterrupted):
        distill_labels(make_job(data, ENERGY, out, teachers["mixed"], stop_after_chunks=2, **SIZES))
    _distill_cli(tmp_path, data, teachers["mixed"], out, *DDP)
    assert _shard_ranks(tmp_path / "labels.h5.shards") == {
        "chunk-000000.h5": 0, "chunk-000001.h5": 0, "chunk-000002.h5": 0}
    assert_same_labels(out, reference, ignore_attrs=("created",))


# ----------------------------------------------------------------------------- refusals
def test_mismatched_dataset_or_teachers_are_refused(data, teachers, reference, tmp_path):
    # same molecules and shapes, other coordinates: only the hash tells them apart
    other = write_ani1x_file(tmp_path / "other.h5", n_conf=12, seed=4)
    records, _ = read_molecules(other, ENERGY)
    with pytest.raises(LabelMismatchError, match="re-run distill.py on this dataset"):
        read_labels(reference, records, dataset_path=other)
    assert len(read_labels(reference, records)) == 8  # no dataset path given: no hash check
    verify_teachers(reference, teachers["mixed"])
    with pytest.raises(LabelMismatchError, match="not from the 2 given"):
        verify_teachers(reference, teachers["other"])
    with pytest.raises(LabelMismatchError, match="differs in: teachers"):
        distill_labels(make_job(data, ENERGY, reference, teachers["other"], **SIZES))
    cfg = make_cfg(other, "stage=student", f"distill.labels={reference}", SMALL_ANI)
    with pytest.raises(LabelMismatchError, match="sha256"):
        build_datamodule(cfg).setup()
    cfg = make_cfg(data, "stage=student", f"distill.labels={reference}",
                   f"distill.teachers=[{','.join(teachers['other'])}]", SMALL_ANI)
    with pytest.raises(LabelMismatchError, match="teacher"):
        run_training(cfg, tmp_path / "student")


def test_corrupt_label_files_are_refused(data, teachers, reference, tmp_path):
    records, _ = read_molecules(data, ENERGY)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(reference.read_bytes()[: reference.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated.h5"):
        read_labels(truncated, records)
    with pytest.raises(DataError, match="not an ekd label file"):
        read_labels(data, records)
    broken = tmp_path / "broken.h5"
    shutil.copy(reference, broken)
    with h5py.File(broken, "a") as f:
        del f["CH4"]["forces_std"]
    with pytest.raises(DataError, match="'CH4' is incomplete or corrupt"):
        read_labels(broken, records)
    with pytest.raises(DataError, match="truncated.h5.*overwrite=true"):
        distill_labels(make_job(data, ENERGY, truncated, teachers["other"], **SIZES))


# ----------------------------------------------------------------------------- teachers
def test_teacher_specifications(teachers, tmp_path):
    for run, names in {"runA": ("best", "last"), "runB": ("last",)}.items():
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        for name in names:
            shutil.copy(teachers["mixed"][0], tmp_path / run / "checkpoints" / f"{name}.ckpt")
    found = [Path(s.name).relative_to(tmp_path).as_posix() for s in resolve_teachers(str(tmp_path))]
    assert found == ["runA/checkpoints/best.ckpt", "runB/checkpoints/last.ckpt"]
    last = resolve_teachers({"dir": str(tmp_path), "pattern": "**/last.ckpt"})
    assert [Path(s.name).parent.parent.name for s in last] == ["runA", "runB"]
    assert [s.name for s in resolve_teachers(teachers["mixed"])] == teachers["mixed"]
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_teachers(["missing.ckpt"])
    with pytest.raises(CheckpointError, match="no teachers given"):
        resolve_teachers(None)
    with pytest.raises(CheckpointError, match="unknown pretrained teacher"):
        resolve_teachers("torchani_ani3x")
    assert teachers_override_argv(["distill.py", "teachers.dir=runs", "out=x.h5"]) == [
        "distill.py", "+teachers.dir=runs", "out=x.h5"]


def test_pretrained_teachers_without_weights_say_how_to_get_them(tmp_path, monkeypatch):
    pytest.importorskip("torchani")
    monkeypatch.setenv("TORCHANI_DATA_DIR", str(tmp_path))
    with pytest.raises(CheckpointError) as info:
        resolve_teachers("torchani_ani1ccx")
    message = str(info.value)
    assert "ani1ccx_state_dict.pt" in message and str(tmp_path / "StateDicts") in message
    assert "torchani.models.ANI1ccx()" in message and "huggingface.co/roitberg-group/ani1ccx" in message
    assert "TORCHANI_DATA_DIR" in message and not (tmp_path / "StateDicts").exists()


def test_pretrained_teachers_from_local_torchani_weights(tmp_path, monkeypatch):
    pytest.importorskip("torchani")
    from ase.build import molecule
    from torchani.arch import Assembler

    # a random 8-member ANI-1x ensemble saved where torchani keeps the published weights
    torch.manual_seed(0)

    asm = Assembler(periodic_table_index=True)
    asm.set_symbols(("H", "C", "N", "O"))
    asm.set_global_cutoff_fn("cosine")
    asm.set_aev_computer(radial="ani1x", angular="ani1x", strategy="pyaev")
    asm.set_atomic_networks(ctor="ani1x")
    asm.set_neighborlist("all_pairs")
    asm.set_self_energies({"H": -0.5, "C": -38.0, "N": -54.6, "O": -75.0})
    reference = asm.assemble(8).double()
    (tmp_path / "StateDicts").mkdir()
    torch.save(reference.state_dict(), tmp_path / "StateDicts" / "ani1x_state_dict.pt")
    monkeypatch.setenv("TORCHANI_DATA_DIR", str(tmp_path))

    sources = resolve_teachers(["torchani_ani1x"])
    assert [s.name for s in sources] == [f"torchani_ani1x[{i}]" for i in range(8)]
    ensemble = TeacherEnsemble([m.double() for m in load_teachers(sources)])
    assert len(ensemble.groups) == 1 and ensemble.groups[0].num_teachers == 8
    mols = [molecule(n) for n in ("CH3CH2OH", "CH3CONH2", "HCOOH")]
    width = max(len(m) for m in mols)
    numbers = torch.full((3, width), -1)
    coords = torch.zeros(3, width, 3, dtype=torch.float64)
    for i, m in enumerate(mols):
        numbers[i, : len(m)] = torch.tensor(m.numbers)
        coords[i, : len(m)] = torch.tensor(m.positions)
    expected = reference.members_forces((numbers, coords))
    z = torch.tensor(np.concatenate([m.numbers for m in mols]))
    pos = torch.tensor(np.concatenate([m.positions for m in mols]))
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor([len(m) for m in mols]))
    energies, forces = ensemble(z, pos, batch, 3)
    torch.testing.assert_close(energies, expected.energies, atol=1e-8, rtol=0)
    torch.testing.assert_close(forces, expected.forces[:, numbers >= 0], atol=1e-8, rtol=0)


# ----------------------------------------------------------------------------- students
def test_uncertainty_force_loss_is_wired_and_changes_the_loss(data, reference):
    cfg = make_cfg(data, "stage=student", f"distill.labels={reference}", SMALL_ANI,
                   "loss.forces.weighting=inverse_variance")
    dm = build_datamodule(cfg)
    dm.setup()
    weighted = build_module(cfg, dm)
    assert weighted.hparams.loss["forces"]["weighting"] == "inverse_variance"
    plain = build_module(make_cfg(data, "stage=student", f"distill.labels={reference}", SMALL_ANI), dm)
    assert plain.hparams.loss["forces"]["weighting"] == "uniform"
    plain.load_state_dict(weighted.state_dict())
    batch = next(iter(dm.train_dataloader()))
    assert float(batch.label_force_var.std()) > 0  # the teachers disagree more on some atoms
    energies, forces = weighted(batch)
    assert not torch.isclose(weighted.loss_terms["forces"](energies, forces, batch),
                             plain.loss_terms["forces"](energies, forces, batch))
    with pytest.raises(ConfigError, match=r"loss.forces.weighting='huber': use one of \['uniform', "):
        build_module(make_cfg(data, "stage=student", f"distill.labels={reference}",
                              "loss.forces.weighting=huber"), dm)


@pytest.fixture(scope="module")
def trained(ani1x_file, tmp_path_factory) -> dict:
    """Two tiny ANI teachers trained on energies (train.py's run_training, as in EKD) and their
    labels of the 320-conformation EMT file."""
    folder = tmp_path_factory.mktemp("trained")
    paths = []
    for seed in (0, 1):
        cfg = make_cfg(ani1x_file, "stage=teacher", "trainer.max_epochs=8", SMALL_ANI,
                       "optim.lr=3e-3", f"seed={seed}")
        paths.append(run_training(cfg, folder / f"teacher{seed}")["best_checkpoint"])
    labels = distill_labels(make_job(ani1x_file, ENERGY, folder / "labels.h5", paths,
                                     elements=["H", "C", "N", "O"], batch_size=16))
    return {"teachers": paths, "labels": labels}


def _errors(module: PotentialModule, dm: EKDDataModule) -> tuple[float, float]:
    """Energy MAE (Hartree) vs the reference and force RMSE (Hartree/Å) vs the distilled labels,
    over the training split."""
    energy, force, n, atoms = 0.0, 0.0, 0, 0
    for batch in dm._loader("train", shuffle=False):
        energies, forces = module(batch)
        energy += float((energies.detach() - batch.energy).abs().sum())
        force += float(((forces.detach() - batch.label_forces) ** 2).sum())
        n, atoms = n + batch.num_graphs, atoms + batch.num_nodes
    return energy / n, (force / (3 * atoms)) ** 0.5


def test_student_fits_given_labels(ani1x_file, trained, tmp_path):
    cfg = make_cfg(ani1x_file, "stage=student", f"distill.labels={trained['labels']}", SMALL_ANI,
                   "trainer.max_epochs=8", "optim.lr=3e-3", "loss.forces.weight=1.0")
    dm = build_datamodule(cfg)
    dm.setup()
    torch.manual_seed(cfg.seed)
    before = _errors(build_module(cfg, dm), dm)
    metrics = run_training(cfg, tmp_path / "student")
    after = _errors(load_potential(metrics["best_checkpoint"]), dm)
    assert after[0] < 0.5 * before[0] and after[1] < 0.5 * before[1], (before, after)


def test_student_with_labels_distilled_on_the_fly(ani1x_file, trained, tmp_path):
    cfg = make_cfg(ani1x_file, "stage=student",
                   f"distill.teachers=[{','.join(trained['teachers'])}]", SMALL_ANI,
                   "trainer.max_epochs=2")
    run_dir = tmp_path / "student"
    metrics = run_training(cfg, run_dir)
    labels = run_dir / "labels.h5"
    assert_same_labels(labels, trained["labels"], ignore_attrs=("created",))
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["labels"] == str(labels) and info["labels_sha256"]
    assert np.isfinite(metrics["test/energy_mae"])
    # a restarted run reuses its labels
    stamp = labels.stat().st_mtime_ns
    run_training(OmegaConf.merge(cfg, {"trainer": {"max_epochs": 3}}), run_dir)
    assert labels.stat().st_mtime_ns == stamp
