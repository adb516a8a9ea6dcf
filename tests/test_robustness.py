"""Robustness (issue 6): bad input gets the project's own errors, interrupted or numerically
broken runs lose nothing, and the same seed gives the same metrics.

Already covered elsewhere: not-HDF5/truncated files, missing or misspelt keys, shape mismatches,
NaN coordinates, all-NaN energies, zero atoms and duplicated atoms (test_readers.py); label
files for another dataset or other teachers (test_distill.py); loading a checkpoint of another
architecture with ``load_potential`` (test_training.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ANI, write_ani1x_file
from ekd_lightning.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EKDError,
    NonFiniteLossError,
)
from ekd_lightning.data import read_molecules
from ekd_lightning.data.readers import check_elements, detect_format
from ekd_lightning.task.module import PotentialModule
from ekd_lightning.train.callbacks import KILL_ENV
from ekd_lightning.train.training import computed_config, register_resolvers, run_training

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "data.energy_key=emt.energy", "data.force_key=emt.forces", "data.batch_size=8", "logger=csv",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "optim.lr=3e-3",
    "trainer.max_epochs=3",
]
TINY = [*TINY_RUN, "model.hidden={H:[8],C:[8],N:[8],O:[8]}"]
"""A tiny ANI model on a 32-conformation file: 4 training batches per epoch, 3 epochs."""


# =========================================================================== bad input
def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def _replace(group, key, data):
    del group[key]
    group[key] = data


@pytest.fixture
def small(tmp_path):
    return write_ani1x_file(tmp_path / "bad.h5", n_conf=3, molecules=["CH4", "H2O"])


def _single_atom(f):
    f.create_group("H")
    f["H/atomic_numbers"] = np.array([1])
    f["H/coordinates"] = np.zeros((3, 1, 3))
    f["H/emt.energy"] = np.full(3, -0.5)
    f["H/emt.forces"] = np.zeros((3, 1, 3))


def _sulfur(f):  # H2S: H2O's geometry with the oxygen made sulfur
    f.copy("H2O", "H2S")
    f["H2S/atomic_numbers"][0] = 16


@pytest.mark.parametrize(
    "edit, kwargs, message",
    [
        (_single_atom, {}, "group '/H' is a single atom (H): an interatomic potential needs at least two atoms"),
        (lambda f: f["H2O/coordinates"].__setitem__((2, 1, 0), np.inf), {}, "'coordinates' has NaN/inf values (conformations [2]"),
        (_sulfur, {"elements": ["H", "C", "N", "O"], "other_elements": "error"},
         "group '/H2S' contains element(s) ['S'], not among the model's elements ['H', 'C', 'N', 'O']; "
         "skip such molecules by reading with data.elements="),
        (lambda f: None, {"elements": ["S"]},
         "had elements ['C', 'H', 'O'] outside ['S'] (set data.elements to include them)"),
        (lambda f: (f["H2O"].__delitem__("emt.energy"), f["H2O"].create_group("emt.energy")), {},
         "'/H2O/emt.energy' is not a dataset (Group)"),
        (lambda f: _replace(f["H2O"], "coordinates", np.array([[[b"x"] * 3] * 3] * 3)), {},
         "'/H2O/coordinates' has dtype |S1, expected real numbers"),
        (lambda f: _replace(f["H2O"], "emt.energy", h5py.Empty("f8")), {}, "'/H2O/emt.energy' holds no array"),
        (lambda f: _replace(f["H2O"], "atomic_numbers", np.array([[b"O", b"H", b"H"]])), {},
         "group '/H2O' has 'atomic_numbers' of shape (1, 3), expected (n_atoms,)"),
        (lambda f: _replace(f["H2O"], "atomic_numbers", np.array([b"O", b"\xff", b"H"])), {},
         "group '/H2O' has unknown element"),
        (lambda f: f.attrs.__setitem__("forces_convention", 3), {}, "forces_convention=3 is not one of"),
    ],
    ids=["single-atom", "inf-coordinates", "element-outside-model", "only-other-elements",
         "group-not-dataset", "string-coordinates", "empty-dataset", "2d-species",
         "undecodable-species", "bad-convention"],
)
def test_bad_input_names_file_group_and_problem(small, edit, kwargs, message):
    _edit(small, edit)
    with pytest.raises(DataError) as info:
        read_molecules(small, "emt.energy", "emt.forces", **kwargs)
    assert str(small) in str(info.value) and message in str(info.value)


def test_other_elements_are_skipped_with_a_warning(small, caplog):
    _edit(small, _sulfur)
    with caplog.at_level("WARNING", logger="ekd_lightning.data.readers"):
        records, report = read_molecules(small, "emt.energy", elements=["H", "C", "N", "O"])
    assert sorted(r.key for r in records) == ["CH4", "H2O"] and report.dropped_elements == 3
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(small) in warning and "['S']" in warning and "['H2S']" in warning
    assert "data.elements" in warning
    everything, _ = read_molecules(small, "emt.energy")
    with pytest.raises(DataError, match=r"group '/H2S' contains element\(s\) \['S'\]"):
        check_elements(small, everything, ["H", "C", "N", "O"])


def test_model_refuses_unknown_element():
    import torch

    module = PotentialModule({"_target_": ANI, "hidden": {e: [8] for e in "HCNO"}})
    z = torch.tensor([16, 1, 1])
    with pytest.raises(DataError, match=r"element\(s\) \['S'\] are not among this model's elements.*data.elements"):
        module.model(z, torch.randn(3, 3), torch.zeros(3, dtype=torch.long), 1)


# --------------------------------------------------------------------------- property test
NAMES = ["atomic_numbers", "species", "coordinates", "emt.energy", "emt.forces", "energies", "forces", "x"]


def _random_array(rng: np.random.Generator, n_conf: int, n_atoms: int):
    """An array of a random kind: right or wrong shape, dtype and values (NaN, inf, junk)."""
    kind = rng.integers(9)
    dims = [n_conf, n_atoms, 3, 0, 1, 2][: rng.integers(0, 4)]
    dims = [int(rng.choice([d, d, rng.integers(0, 4)])) for d in dims]
    if kind == 0:
        return rng.normal(size=dims)
    if kind == 1:
        return rng.choice([np.nan, np.inf, -np.inf, 0.0, 1e308], size=dims)
    if kind == 2:
        return rng.integers(-2, 130, size=dims)
    if kind == 3:
        return rng.choice([b"H", b"C", b"Xx", b"", b"\xff"], size=dims)
    if kind == 4:
        return rng.integers(0, 2, size=dims).astype(bool)
    if kind == 5:
        return np.zeros(dims, dtype=[("a", "f4"), ("b", "i2")])
    if kind == 6:
        return h5py.Empty("f8")
    if kind == 7:
        return (rng.normal(size=dims) + 1j).astype(np.complex64)
    return rng.normal(size=dims).astype(np.float16)


def _write_random_file(path: Path, seed: int, n_mutations: int, layout: str, truncate: float | None):
    """A valid two-molecule file in ``layout``, then random mutations, then maybe truncation."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        if rng.random() < 0.3:
            f.attrs["forces_convention"] = str(rng.choice(["-dE/dx", "dE/dx", "junk"]))
        groups = []
        for i, (numbers, symbols) in enumerate([([8, 1, 1], [b"O", b"H", b"H"]), ([6, 1, 1, 1, 1], [b"C"] + [b"H"] * 4)]):
            n_conf = int(rng.integers(0, 4))
            g = f.create_group(f"M{i}" if layout == "ani1x" else f"sub{i % 2}/mol{i:02d}")
            if layout == "ani1x":
                g["atomic_numbers"] = np.array(numbers)
            else:
                g["species"] = np.array(symbols)
            base = np.arange(len(numbers))[:, None] * np.array([1.1, 0.3, 0.0])
            g["coordinates"] = base + rng.normal(0, 0.05, (n_conf, len(numbers), 3))
            g["emt.energy" if layout == "ani1x" else "energies"] = rng.normal(size=n_conf)
            g["emt.forces" if layout == "ani1x" else "forces"] = rng.normal(size=(n_conf, len(numbers), 3))
            groups.append((g, n_conf, len(numbers)))
        for _ in range(n_mutations):
            g, n_conf, n_atoms = groups[rng.integers(len(groups))]
            name = str(rng.choice(NAMES))
            action = rng.integers(4)
            if name in g:
                del g[name]
            if action == 0:
                continue  # deleted
            if action == 1:
                g.create_group(name)
            elif action == 2:
                g.create_dataset(name, data=_random_array(rng, n_conf, n_atoms))
            else:  # a stray, maybe molecule-looking, group somewhere else
                stray = f.require_group(f"stray{rng.integers(3)}")
                if name in stray:
                    del stray[name]
                stray.create_dataset(name, data=_random_array(rng, n_conf, n_atoms))
    if truncate is not None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * truncate)])


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_mutations=st.integers(0, 4),
    layout=st.sampled_from(["ani1x", "comp6"]),
    truncate=st.none() | st.floats(0.0, 0.999),
    file_format=st.sampled_from(["auto", "ani1x", "comp6"]),
    elements=st.none() | st.just(["H", "C", "N", "O"]) | st.just(["H", "O"]),
    with_forces=st.booleans(),
    forces_are_gradients=st.sampled_from([None, True, False]),
)
def test_random_malformed_files_load_or_raise_ekd_errors(
    seed, n_mutations, layout, truncate, file_format, elements, with_forces, forces_are_gradients
):
    energy_key = "emt.energy" if layout == "ani1x" else "energies"
    force_key = ("emt.forces" if layout == "ani1x" else "forces") if with_forces else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.h5"
        _write_random_file(path, seed, n_mutations, layout, truncate)
        try:
            detect_format(path)
            records, report = read_molecules(path, energy_key, force_key, file_format, elements,
                                             forces_are_gradients=forces_are_gradients)
        except EKDError:
            return  # the project's own error: fine; anything else fails the test
    assert records and report.conformations == sum(r.num_conformations for r in records)
    for r in records:
        n_conf, n_atoms = r.coordinates.shape[:2]
        assert n_atoms >= 2 and r.coordinates.shape == (n_conf, n_atoms, 3)
        assert r.energies.shape == (n_conf,) and np.isfinite(r.energies).all()
        assert np.isfinite(r.coordinates).all()
        if force_key:
            assert r.forces.shape == r.coordinates.shape and np.isfinite(r.forces).all()


# =========================================================================== training runs
def make_cfg(data_file, *overrides, base=TINY):
    register_resolvers()
    with initialize_config_module(config_module="ekd_lightning.conf", version_base="1.3"):
        return compose("train", overrides=[f"data.path={data_file}", *base, *overrides])


def test_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("test/")}


test_metrics.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return write_ani1x_file(tmp_path_factory.mktemp("tiny") / "tiny.h5", n_conf=8,
                            molecules=["CH4", "H2O", "NH3", "CH3OH"])


@pytest.fixture(scope="module")
def reference(tiny_file, tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted 3-epoch run (in this process)."""
    run_dir = tmp_path_factory.mktemp("reference")
    return run_dir, run_training(make_cfg(tiny_file), run_dir)


def test_same_seed_same_metrics(tiny_file, reference, tmp_path):
    again = run_training(make_cfg(tiny_file), tmp_path / "again")
    floats = {k: v for k, v in reference[1].items() if isinstance(v, float) and k != "train_time_s"}
    assert len(test_metrics(floats)) >= 4 and all(math.isfinite(v) for v in floats.values())
    assert {k: again[k] for k in floats} == floats  # bit-identical on CPU
    other = run_training(make_cfg(tiny_file, "seed=1", "trainer.max_epochs=1"), tmp_path / "seed1")
    assert other["test/energy_mae"] != floats["test/energy_mae"]


def _copy_run(reference, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    return run_dir


def _poison_training_step(monkeypatch, epoch: int, batch: int):
    original = PotentialModule.training_step

    def poisoned(self, batch_, batch_idx):
        loss = original(self, batch_, batch_idx)
        return loss * math.nan if (self.current_epoch, batch_idx) == (epoch, batch) else loss

    monkeypatch.setattr(PotentialModule, "training_step", poisoned)


def _poison_validation(monkeypatch, epoch: int):
    original = PotentialModule.weighted_loss

    def poisoned(self, weights, energies, forces, batch_):
        loss = original(self, weights, energies, forces, batch_)
        bad = not self.training and not self.trainer.sanity_checking and self.current_epoch == epoch
        return loss * math.nan if bad else loss

    monkeypatch.setattr(PotentialModule, "weighted_loss", poisoned)


@pytest.mark.parametrize("where", ["train", "val"])
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tiny_file, reference, tmp_path, monkeypatch, where):
    run_dir = _copy_run(reference, tmp_path)  # finished 3 epochs (4 batches each): continue to 5
    checkpoints = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").glob("*.ckpt")}
    assert set(checkpoints) == {"best.ckpt", "last.ckpt"}
    if where == "train":
        _poison_training_step(monkeypatch, epoch=3, batch=1)
        expected = "training loss is nan at epoch 3, global step 13, batch 1 (conformations of groups"
    else:
        _poison_validation(monkeypatch, epoch=3)
        expected = "validation loss is nan after epoch 3 (global step 16)"
    with pytest.raises(NonFiniteLossError) as info:
        run_training(make_cfg(tiny_file, "trainer.max_epochs=5"), run_dir)
    assert expected in str(info.value)
    assert f"last good checkpoint {run_dir / 'checkpoints' / 'last.ckpt'} is left intact" in str(info.value)
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").glob("*.ckpt")} == checkpoints
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == reference[1]  # the finished 3-epoch run's record is untouched


def test_finished_run_is_skipped_and_other_config_is_not(tiny_file, reference, tmp_path, monkeypatch):
    import pytorch_lightning as pl

    run_dir = _copy_run(reference, tmp_path)
    def no_trainer(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pl, "Trainer", no_trainer)
    assert run_training(make_cfg(tiny_file), run_dir) == reference[1]
    with pytest.raises(ConfigError, match=r"another config \(optim.lr: 0.003 -> 0.001\)"):
        run_training(make_cfg(tiny_file, "optim.lr=1e-3"), run_dir)  # neither skipped nor resumed


def test_resume_from_another_architecture_is_refused(tiny_file, reference, tmp_path):
    run_dir = _copy_run(reference, tmp_path)
    with pytest.raises(ConfigError, match=r"another config \(model._target_: ekd_lightning.models.ani.ANIModel -> "
                       r"ekd_lightning.models.schnet.SchNetModel"):
        run_training(make_cfg(tiny_file, "model=schnet", "model.num_interactions=1",
                              base=TINY_RUN), run_dir)
    # the module's own check, for a last.ckpt whose run_info.json says otherwise
    (run_dir / "metrics.json").unlink()
    info = json.loads((run_dir / "run_info.json").read_text())
    schnet = make_cfg(tiny_file, "model=schnet", "model.num_interactions=1", base=TINY_RUN)
    info["computed_config"] = computed_config(schnet)
    (run_dir / "run_info.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"last.ckpt: cannot load a checkpoint of another model: it holds "
                       r"\{'_target_': 'ekd_lightning.models.ani.ANIModel'.*this run builds "
                       r"\{'_target_': 'ekd_lightning.models.schnet.SchNetModel'"):
        run_training(schnet, run_dir)


def test_sigkill_mid_epoch_then_restart_resumes_exactly(tiny_file, reference, tmp_path):
    """train.py (multirun) SIGKILLed in the middle of epoch 1, restarted with the same command:
    resumes from last.ckpt (end of epoch 0) and ends with the uninterrupted run's exact test
    metrics; a third identical command skips the finished job. Exact because last.ckpt also
    holds the random generators' state (ekd_lightning.train.callbacks.ResumableRNG)."""
    sweep = tmp_path / "sweep"
    command = [sys.executable, str(ROOT / "train.py"), "-m", f"hydra.sweep.dir={sweep}",
               f"data.path={tiny_file}", *TINY]
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}

    def train(**extra):
        return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                              env={**env, **extra})

    killed = train(**{KILL_ENV: "1:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run_dir,) = [p.parent.parent for p in sweep.glob("*/checkpoints/last.ckpt")]
    assert not (run_dir / "metrics.json").exists()
    resumed = train()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert test_metrics(metrics) == test_metrics(reference[1]) and len(test_metrics(metrics)) >= 4
    assert metrics["val/loss"] == reference[1]["val/loss"]
    stamp = (run_dir / "metrics.json").stat().st_mtime_ns, (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    again = train()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished with this config" in again.stdout + again.stderr
    assert ((run_dir / "metrics.json").stat().st_mtime_ns, (run_dir / "checkpoints" / "last.ckpt").read_bytes()) == stamp
