"""The "Add a model" example of docs/add-a-model.md (one module file and one YAML file, nothing else) trains
with ``train.py`` and its checkpoint loads from the file alone; callbacks and loss terms are
YAML entries too."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ase.build import molecule

from ekd_lightning.core.errors import ConfigError
from ekd_lightning.core.units import HARTREE_TO_KCALMOL as KCAL
from ekd_lightning.models import instantiate_model
from ekd_lightning.models.base import energy_and_forces
from ekd_lightning.models.losses import LossTerm
from ekd_lightning.task.checkpoint import load_potential
from ekd_lightning.train.training import build_datamodule, build_module
from test_training import SMALL_ANI, make_cfg

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.energy_key=emt.energy", "data.force_key=emt.forces", "data.batch_size=32",
        "logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def readme_block(language: str, first_line: str) -> str:
    """The fenced ``language`` block of docs/add-a-model.md that starts with ``first_line``."""
    page = (ROOT / "docs" / "add-a-model.md").read_text()
    blocks = re.findall(rf"```{language}\n(.*?)```", page, flags=re.S)
    (block,) = [b for b in blocks if b.startswith(first_line + "\n")]
    return block


def train_py(cwd: Path, *args: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (pythonpath, os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300, env=env)


def test_readme_model_example_trains_and_loads_from_its_checkpoint(ani1x_file, tmp_path,
                                                                   monkeypatch):
    """Mutation caught: a docs example that does not run (a wrong ``_target_``, an
    ``atomic_contributions`` that fails) or a checkpoint that cannot rebuild the model."""
    (tmp_path / "my_models.py").write_text(readme_block("python", "# my_models.py"))
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "distance_mlp.yaml").write_text(
        readme_block("yaml", "# my_conf/model/distance_mlp.yaml"))
    done = train_py(tmp_path, f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
                    "model=distance_mlp", "stage=teacher", "trainer.max_epochs=1",
                    f"data.path={ani1x_file}", *TINY, pythonpath=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "teacher-distance_mlp-seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0 < metrics["test/force_mae"] < 1e3

    monkeypatch.syspath_prepend(str(tmp_path))  # the module importable, as the page says
    module = load_potential(run / "checkpoints" / "best.ckpt")
    assert type(module.model).__name__ == "DistanceMLP" and module.model_name == "distance_mlp"
    atoms = molecule("CH3OH")
    z, pos = torch.tensor(atoms.numbers), torch.tensor(atoms.positions, dtype=torch.float64)
    model = module.model.double()
    energy, forces = energy_and_forces(model, z, pos, torch.zeros(len(z), dtype=torch.long), 1)
    step = torch.zeros_like(pos)
    step[1, 2] = 1e-5  # forces are -dE/dx of the trained model (central difference)
    plus = model(z, pos + step, torch.zeros(len(z), dtype=torch.long), 1)
    minus = model(z, pos - step, torch.zeros(len(z), dtype=torch.long), 1)
    assert float(forces[1, 2].detach()) == pytest.approx(-float((plus - minus).detach()) / 2e-5,
                                                        rel=1e-4, abs=1e-8)


def test_callbacks_are_yaml_entries_selected_together(ani1x_file, tmp_path):
    """``callbacks=[early_stopping,lr_monitor]``: both built from their YAML files; the learning
    rate reaches the logger. Mutation caught: build_callbacks dropping an entry."""
    done = train_py(tmp_path, "callbacks=[early_stopping,lr_monitor]", "trainer.max_epochs=2",
                    "model.hidden={H:[8],C:[8],N:[8],O:[8]}", f"data.path={ani1x_file}", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "teacher-ani2x-seed0"
    info = json.loads((run / "run_info.json").read_text())
    assert set(info["config"]["callbacks"]) == {"early_stopping", "lr_monitor"}
    (log,) = run.glob("teacher-ani2x-seed0/version_0/metrics.csv")
    assert "lr-AdamW" in log.read_text().splitlines()[0]


@pytest.mark.parametrize("override, replacement", [
    ("loss.force_weight=1.0", "loss.force_weight was replaced by loss.forces.weight"),
    ("distill.force_loss=uncertainty", "distill.force_loss was replaced by loss.forces.weighting"),
    ("model.kwargs.hidden_channels=8", "model.kwargs.hidden_channels was replaced by model.<argument>"),
])
def test_keys_of_the_previous_layout_name_their_replacement(tmp_path, override, replacement):
    done = train_py(tmp_path, "stage=student", override)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"error: {replacement}")


class MeanEnergyError(LossTerm):
    """A term added by a user: the squared mean energy error of the batch, (kcal/mol)²."""

    def __call__(self, energies, forces, batch):
        return (((energies - batch.energy) * KCAL).mean() ** 2).float()


def test_a_new_loss_term_is_one_class_and_one_yaml_entry(ani1x_file):
    """``+loss.offset={_target_: ..., weight: 2.0}`` adds the term to the training and the
    validation loss. Mutation caught: a loss that sums only the stage's own terms."""
    cfg = make_cfg(ani1x_file, "stage=teacher", SMALL_ANI,
                   "+loss.offset={_target_: test_add_model.MeanEnergyError, weight: 2.0}")
    dm = build_datamodule(cfg)
    dm.setup()
    module = build_module(cfg, dm)
    assert list(module.loss_terms) == ["energy", "offset"]
    batch = next(iter(dm.train_dataloader()))
    total, energies, forces = module.loss(batch, create_graph=False)
    energy = module.loss_terms["energy"](energies, forces, batch)
    offset = MeanEnergyError()(energies, forces, batch)
    assert float(offset.detach()) > 0 and torch.equal(total, energy + 2.0 * offset)


def test_a_model_config_of_the_previous_layout_names_its_replacement():
    """A user's own model YAML with ``arch``/``kwargs`` (the layout before ``_target_``)."""
    with pytest.raises(ConfigError, match=r"^model config 'mine': model.arch was replaced by "
                                          r"model._target_ \(the model class"):
        instantiate_model({"name": "mine", "arch": "ani", "kwargs": {"hidden": None}}, ["H"])
