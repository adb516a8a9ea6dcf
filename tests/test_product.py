"""An installable product (issue 14): model configs with their own run folders, checkpoints of
0.1.0 still loading, and checkpoints that cannot run code when loaded."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from conftest import ANI
from ekd_lightning.conf import __file__ as conf_init
from ekd_lightning.core.errors import CheckpointError
from ekd_lightning.models import instantiate_model
from ekd_lightning.models.ani import ANIModel
from ekd_lightning.models.losses import ForceLoss
from ekd_lightning.models.mace import MACEModel
from ekd_lightning.models.schnet import SchNetModel
from ekd_lightning.models.visnet import ViSNetModel
from ekd_lightning.task.checkpoint import AtomicCheckpointIO, load_potential
from ekd_lightning.task.module import PotentialModule
from ekd_lightning.train.training import config_sha256, register_resolvers, run_training
from ekd_lightning.workflow.compose import compose_train
from ekd_lightning.workflow.pipeline import default_teacher_labels, teacher_jobs

MODEL_CONFIGS = sorted(p.stem for p in (Path(conf_init).parent / "model").glob("*.yaml"))


def test_default_run_folders_of_every_model_config_differ():
    register_resolvers()
    folders, classes = {}, set()
    with initialize_config_module(config_module="ekd_lightning.conf", version_base="1.3"):
        for name in MODEL_CONFIGS:
            cfg = compose("train", overrides=[f"model={name}"], return_hydra_config=True)
            folders[name] = cfg.hydra.run.dir
            classes.add(type(instantiate_model(cfg.model, ["H", "C", "N", "O"])))
    assert len(MODEL_CONFIGS) >= 4 and len(set(folders.values())) == len(folders), folders
    assert all(folders[name] == f"runs/teacher-{name}-seed0" for name in MODEL_CONFIGS)
    assert classes == {ANIModel, SchNetModel, ViSNetModel, MACEModel}


def _small_ani() -> PotentialModule:
    torch.manual_seed(0)
    return PotentialModule({"_target_": ANI, "hidden": {e: [8] for e in "HCNO"}},
                           self_energies=[-0.5, -38, -54, -75])


def _energy(module: PotentialModule) -> float:
    from ase.build import molecule
    from torch_geometric.data import Batch, Data

    atoms = molecule("CH3OH")
    data = Data(z=torch.tensor(atoms.numbers), pos=torch.tensor(atoms.positions, dtype=torch.float32))
    energies, _ = module(Batch.from_data_list([data]), with_forces=False)
    return float(energies[0].detach())


def _previous_layout(module: PotentialModule, model_name: str, **loss) -> dict:
    """The hyperparameters the module would have had before configs instantiated objects."""
    hparams = {k: v for k, v in module.hparams.items() if k not in ("model", "loss")}
    model_kwargs = {k: v for k, v in module.hparams.model.items() if k != "_target_"}
    return {**hparams, "model_name": model_name, "model_kwargs": model_kwargs, "energy_weight": 1.0,
            "force_weight": 0.0, "force_target": "none", "force_loss": "mse",
            "variance_floor": 1.0, "force_warmup_epochs": 0, **loss}


@pytest.mark.parametrize("model_name", ["ani2x", "ani"])  # 0.1.0 stored the config's name
def test_checkpoint_of_the_previous_layout_still_loads(tmp_path, model_name):
    module = _small_ani()
    hparams = _previous_layout(module, model_name, force_target="labels", force_weight=0.5,
                               force_loss="uncertainty", variance_floor=2.0, force_warmup_epochs=3)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, tmp_path / "old.ckpt")
    loaded = load_potential(tmp_path / "old.ckpt", expected_model=ANIModel)
    assert _energy(loaded) == _energy(module.eval())
    assert loaded.hparams.model == {"_target_": ANI, "hidden": {e: [8] for e in "HCNO"}}
    forces = loaded.loss_terms["forces"]  # the same loss, as terms
    assert isinstance(forces, ForceLoss) and (forces.target, forces.weight, forces.weighting,
                                              forces.variance_floor, forces.warmup_epochs) == (
        "labels", 0.5, "inverse_variance", 2.0, 3)
    teacher = _previous_layout(module, model_name)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": teacher}, tmp_path / "t.ckpt")
    assert list(load_potential(tmp_path / "t.ckpt").loss_terms) == ["energy"]


@pytest.mark.parametrize("where, value", [
    ("model", {"_target_": "builtins.dict"}),  # a class, but not a model
    ("model", {"_target_": "os.system"}),  # not a class
    ("model", {"_target_": ANI, "hidden": {"_target_": "os.system", "_args_": ["touch x"]}}),
    ("loss", {"energy": {"_target_": "logging.FileHandler", "filename": "x"}}),  # writes x
])
def test_checkpoint_targets_are_checked_before_anything_is_built(tmp_path, where, value, monkeypatch):
    """A checkpoint's model and loss configs name classes: only model and loss-term classes
    with plain arguments are built, so a planted file cannot call anything else."""
    monkeypatch.chdir(tmp_path)
    module = _small_ani()
    hparams = {**dict(module.hparams), where: value}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match=r"bad.ckpt: cannot rebuild its model: (model|loss.energy)"):
        load_potential(tmp_path / "bad.ckpt")
    assert not (tmp_path / "x").exists()


class Planted:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_checkpoint_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    module = _small_ani()
    planted = tmp_path / "runs" / "teacher-ani2x-seed0" / "checkpoints" / "best.ckpt"
    planted.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "callbacks": {"x": Planted(marker)}}, planted)
    with pytest.raises(CheckpointError, match=r"best.ckpt: refused: .*GLOBAL posix.system"):
        load_potential(planted)  # what evaluate, md and distill's teachers=dir use
    with pytest.raises(Exception, match="posix.system"):
        AtomicCheckpointIO().load_checkpoint(planted)  # what resuming a run uses
    assert not marker.exists()


# ----------------------------------------------------------------------------- commands
ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.energy_key=emt.energy", "data.force_key=emt.forces", "data.batch_size=8",
        "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.max_epochs=1", "model.hidden={H:[8],C:[8],N:[8],O:[8]}"]
ONE_TEACHER = ["distill.default_teachers.models=[ani2x]", "distill.default_teachers.max_epochs=1"]


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    from conftest import write_ani1x_file

    return write_ani1x_file(tmp_path_factory.mktemp("tiny") / "tiny.h5", n_conf=8,
                            molecules=["CH4", "H2O", "NH3", "CH3OH"])


def train_py(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_student_without_labels_uses_the_default_teacher_ensemble(tiny_file, tmp_path, caplog):
    """``python train.py model=ani2x stage=student`` as written: the default ensemble (here cut
    to one 1-epoch teacher) is trained into the run store, its labels cached there, and a second
    student finds both by hash, as the pipeline (experiment=ekd) would."""
    done = train_py(tmp_path, "model=ani2x", "stage=student", f"data.path={tiny_file}", *TINY,
                    *ONE_TEACHER)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "using the default teacher ensemble (distill.default_teachers: ['ani2x'], 1 epochs)" in out
    (teacher,) = (tmp_path / "runs" / "store").glob("teacher-ani2x-seed100-*/metrics.json")
    (labels,) = (tmp_path / "runs" / "store").glob("labels-*.h5")
    info = json.loads((tmp_path / "runs" / "student-ani2x-seed0" / "run_info.json").read_text())
    assert info["labels"] == "runs/store/" + labels.name
    assert f"teacher 1/1: training into runs/store/{teacher.parent.name}" in out
    # each run records the command that composes it: the student's own, and the teacher's,
    # composed inside the running ekd-train from the student's overrides
    assert info["command"] == " ".join([
        "ekd-train", "model=ani2x", "stage=student", f"data.path={tiny_file}",
        *(shlex.quote(o) for o in TINY + ONE_TEACHER),
        shlex.quote(f"hydra.run.dir={tmp_path / 'runs' / 'student-ani2x-seed0'}")])
    program, *overrides, folder = shlex.split(
        json.loads((teacher.parent / "run_info.json").read_text())["command"])
    assert (program, folder) == ("ekd-train", f"hydra.run.dir=runs/store/{teacher.parent.name}")
    assert "callbacks=early_stopping" in overrides and "stage=teacher" in overrides
    assert config_sha256(compose_train(overrides)) == json.loads(teacher.read_text())["config_sha256"]

    store = tmp_path / "runs" / "store"
    command = ["experiment=ekd", f"data.path={tiny_file}", *TINY, f"pipeline.store={store}",
               "pipeline.teachers.models=[ani2x]", "pipeline.teachers.max_epochs=1"]
    pipeline = compose_train(command)
    assert [j.run_dir.name for j in teacher_jobs(pipeline, store, command)] == [teacher.parent.name]
    stamps = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    with caplog.at_level("INFO"), as_under_ekd_train([
            "stage=student", "seed=1", f"data.path={tiny_file}", *TINY, *ONE_TEACHER,
            f"distill.store={store}"]) as student:
        run_training(student, tmp_path / "student1", default_labels=default_teacher_labels)
    assert f"teacher 1/1: found in {teacher.parent}" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == stamps
    assert json.loads((tmp_path / "student1" / "run_info.json").read_text())["labels"] == str(labels)


def test_missing_input_is_one_line_and_exit_code_2(tiny_file, tmp_path):
    done = train_py(tmp_path, "stage=student", f"data.path={tiny_file}", *TINY,
                    f"distill.labels={tmp_path / 'missing.h5'}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'missing.h5'}")


@contextmanager
def as_under_ekd_train(overrides: list[str]):
    """The config ``ekd-train <overrides>`` composes, with Hydra's runtime config set as under
    ekd-train (where the pipeline reads the command's overrides)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register_resolvers()
    with initialize_config_module(config_module="ekd_lightning.conf", version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=overrides)
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        yield cfg
    finally:
        HydraConfig.instance().cfg = None


def test_pipeline_teachers_find_a_users_model_config_through_the_search_path(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tiny_ani.yaml").write_text(
        "name: tiny_ani\narch: ani\nkwargs: {aev: null, hidden: {H: [8], C: [8], N: [8], O: [8]}}\n")
    with as_under_ekd_train(["experiment=ekd", f"hydra.searchpath=[file://{tmp_path}]",
                             "pipeline.teachers.models=[ani2x,tiny_ani]"]) as cfg:
        jobs = teacher_jobs(cfg, tmp_path / "store")
    assert jobs[1].run_dir.name.startswith("teacher-tiny_ani-seed101-")
    assert jobs[1].cfg["model"]["kwargs"]["hidden"]["H"] == [8]
    # its command names the user's folder, so it composes the same run again
    assert f"'hydra.searchpath=[file://{tmp_path}]'" in jobs[1].command
