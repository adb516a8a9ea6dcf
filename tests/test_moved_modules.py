"""What users have keeps working after the layer packages (issue 25): a checkpoint written by
main before the move (its loss terms name ``ekd_lightning.losses.*``) loads and predicts the same
energies and forces, and every old module path imports as the module at its new place.

The checkpoint (tests/data/main_75321d8_schnet_oracle.ckpt, 50 KB) and its energies were made by
main at 75321d8: ``conftest.train_tiny`` on ``write_ani1x_file(n_conf=6)`` with
``model=schnet_small stage=oracle trainer.max_epochs=1`` and 8 channels, filters and gaussians,
one interaction; then :class:`EKDCalculator` on ``ase.build.molecule`` CH4, H2O, NH3 and CH3OH.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule

from ekd_lightning.core.moved import MOVED
from ekd_lightning.inference.calculator import EKDCalculator
from ekd_lightning.task.checkpoint import load_potential

DATA = Path(__file__).resolve().parent / "data"
CKPT = DATA / "main_75321d8_schnet_oracle.ckpt"
ENERGIES = DATA / "main_75321d8_schnet_oracle_energies.json"


def test_the_old_checkpoint_names_the_old_paths():
    """The fixture is what it claims: its hyperparameters name the loss terms by their old path."""
    loss = torch.load(CKPT, weights_only=True)["hyper_parameters"]["loss"]
    assert {term["_target_"] for term in loss.values()} == {
        "ekd_lightning.losses.EnergyLoss", "ekd_lightning.losses.ForceLoss"}


def test_a_checkpoint_of_main_before_the_move_predicts_the_same():
    expected = json.loads(ENERGIES.read_text())
    module = load_potential(CKPT)
    assert type(module.loss_terms["forces"]).__module__ == "ekd_lightning.models.losses"
    for name, ref in expected.items():
        atoms = molecule(name)
        atoms.calc = EKDCalculator(CKPT)
        np.testing.assert_allclose(atoms.get_potential_energy(), ref["energy_eV"], rtol=1e-12)
        np.testing.assert_allclose(atoms.get_forces(), ref["forces_eV_per_A"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_is_the_moved_module(old):
    module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert module.__spec__.name == MOVED[old]  # its own spec, not the old path's


def test_python_dash_m_of_an_old_path_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "ekd_lightning.md", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--checkpoints" in done.stdout
