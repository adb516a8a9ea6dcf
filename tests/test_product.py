"""An installable product (issue 14): model configs with their own run folders, checkpoints of
0.1.0 still loading, and checkpoints that cannot run code when loaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from ekd_lightning.checkpoint import AtomicCheckpointIO, load_potential
from ekd_lightning.conf import __file__ as conf_init
from ekd_lightning.errors import CheckpointError
from ekd_lightning.models import ARCHS
from ekd_lightning.module import PotentialModule
from ekd_lightning.training import register_resolvers

MODEL_CONFIGS = sorted(p.stem for p in (Path(conf_init).parent / "model").glob("*.yaml"))


def test_default_run_folders_of_every_model_config_differ():
    register_resolvers()
    folders, archs = {}, set()
    with initialize_config_module(config_module="ekd_lightning.conf", version_base="1.3"):
        for name in MODEL_CONFIGS:
            cfg = compose("train", overrides=[f"model={name}"], return_hydra_config=True)
            folders[name] = cfg.hydra.run.dir
            archs.add(cfg.model.arch)
    assert len(MODEL_CONFIGS) >= 4 and len(set(folders.values())) == len(folders), folders
    assert all(folders[name] == f"runs/teacher-{name}-seed0" for name in MODEL_CONFIGS)
    assert archs == set(ARCHS)


def _small_ani(arch: str = "ani") -> PotentialModule:
    torch.manual_seed(0)
    return PotentialModule(arch, {"hidden": {e: [8] for e in "HCNO"}}, self_energies=[-0.5, -38, -54, -75])


def _energy(module: PotentialModule) -> float:
    from ase.build import molecule
    from torch_geometric.data import Batch, Data

    atoms = molecule("CH3OH")
    data = Data(z=torch.tensor(atoms.numbers), pos=torch.tensor(atoms.positions, dtype=torch.float32))
    energies, _ = module(Batch.from_data_list([data]), with_forces=False)
    return float(energies[0].detach())


def test_checkpoint_of_0_1_0_still_loads(tmp_path):
    module = _small_ani()
    hparams = dict(module.hparams, model_name="ani2x")  # 0.1.0 stored the config's name
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, tmp_path / "old.ckpt")
    loaded = load_potential(tmp_path / "old.ckpt", expected_model="ani")
    assert loaded.hparams.model_name == "ani" and _energy(loaded) == _energy(module.eval())


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
