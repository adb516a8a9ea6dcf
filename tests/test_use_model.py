"""Using a trained model: the public ASE calculator, ekd-predict and ekd-export.

Checkpoints are real: a tiny ANI and a tiny SchNet trained for a few epochs with the Lightning
Trainer on the EMT fixture, plus random models saved in the checkpoint layout.
"""

import json
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from conftest import ANI, train_tiny
from ekd_lightning import EKDCalculator
from ekd_lightning.core.units import HARTREE_TO_EV
from ekd_lightning.inference.export import main as export_main
from ekd_lightning.inference.predict import main as predict_main
from ekd_lightning.models.base import energy_and_forces
from ekd_lightning.task.checkpoint import load_potential
from ekd_lightning.task.module import PotentialModule
from test_md import make_module
from test_models import water_box

ORACLE = ("trainer.max_epochs=3", "stage=oracle", "loss.forces.weight=1.0")  # true EMT forces
ANI1X_AEV = {"radial_cutoff": 5.2, "radial_eta": 16.0, "radial_start": 0.9, "radial_num_shifts": 16,
             "angular_cutoff": 3.5, "angular_eta": 8.0, "angular_zeta": 32.0, "angular_start": 0.9,
             "angular_num_shifts": 4, "angular_num_sections": 8}


def save_checkpoint(module, path: Path) -> Path:
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(ani1x_file, tmp_path_factory) -> dict[str, Path]:
    """Trained ANI, SchNet, ViSNet and MACE checkpoints (seconds), and a random ANI with ANI-1x
    constants."""
    root = tmp_path_factory.mktemp("use_model")
    torch.manual_seed(5)
    ani1x = PotentialModule({"_target_": ANI, "aev": ANI1X_AEV, "hidden": {e: [16] for e in "HCNO"}},
                            ["H", "C", "N", "O"], [-0.6, -38.1, -54.7, -75.2], 0.05).eval()
    return {
        "ani": train_tiny(ani1x_file, root / "ani", *ORACLE,
                          "model.hidden={H:[32],C:[32],N:[32],O:[32]}"),
        "schnet": train_tiny(ani1x_file, root / "schnet", *ORACLE, "model=schnet",
                             "model.num_interactions=1", "model.hidden_channels=16",
                             "model.num_filters=16", "model.num_gaussians=16"),
        "visnet": train_tiny(ani1x_file, root / "visnet", *ORACLE, "model=visnet_small",
                             "model.hidden_channels=16", "model.num_layers=1"),
        "mace": train_tiny(ani1x_file, root / "mace", *ORACLE, "model=mace_small",
                           "model.hidden_irreps=8x0e+8x1o", "model.mlp_irreps=8x0e"),
        "ani1x": save_checkpoint(ani1x, root / "ani1x.ckpt"),
    }


def rattled(name: str, seed: int = 1, stdev: float = 0.05) -> Atoms:
    atoms = molecule(name)
    atoms.rattle(stdev, seed=seed)
    return atoms


def model_energy_forces(checkpoint: Path, atoms: Atoms, dtype=torch.float64):
    """Energy (Hartree) and forces (Hartree/Å) straight from the checkpoint's model, evaluated
    in float64 or as trained (float32 weights; the energy sums stay float64)."""
    model = load_potential(checkpoint).model
    model = model.double() if dtype == torch.float64 else model
    z, pos = torch.tensor(atoms.numbers), torch.tensor(atoms.positions, dtype=dtype)
    e, f = energy_and_forces(model, z, pos, torch.zeros(len(z), dtype=torch.long), 1)
    return float(e[0].detach()), f.detach().double().numpy()


# --------------------------------------------------------------------------- calculator
@pytest.mark.parametrize("name", ["ani2x", "schnet"])
def test_calculator_forces_are_minus_energy_gradient_in_ev(name):
    atoms = rattled("CH3CH2OH")
    atoms.calc = EKDCalculator(make_module(name), num_threads=1)
    forces = atoms.get_forces()
    assert forces.dtype == np.float64 and forces.shape == (9, 3)
    h, numeric = 1e-4, np.zeros_like(forces)
    for a in range(len(atoms)):
        for k in range(3):
            energies = []
            for sign in (1, -1):
                shifted = atoms.copy()
                shifted.calc = atoms.calc
                shifted.positions[a, k] += sign * h
                energies.append(shifted.get_potential_energy())
            numeric[a, k] = -(energies[0] - energies[1]) / (2 * h)
    np.testing.assert_allclose(forces, numeric, atol=1e-5 * max(1.0, np.abs(forces).max()))


def test_calculator_units_and_caller_module_untouched(tmp_path):
    module = make_module("ani2x")
    atoms = molecule("CH3OH")
    atoms.calc = EKDCalculator(module)
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    path = save_checkpoint(module, tmp_path / "model.ckpt")
    e64, f64 = model_energy_forces(path, atoms)
    assert energy == pytest.approx(e64 * HARTREE_TO_EV, rel=1e-12)
    np.testing.assert_allclose(forces, f64 * HARTREE_TO_EV, rtol=1e-10, atol=1e-12)
    e32, _ = model_energy_forces(path, atoms, torch.float32)  # the module as trained
    assert energy == pytest.approx(e32 * HARTREE_TO_EV, abs=1e-3)
    assert next(module.parameters()).dtype == torch.float32  # the caller's module is not converted
    assert EKDCalculator.from_checkpoint(path).get_potential_energy(atoms.copy()) == pytest.approx(
        energy, rel=1e-12)
    assert "energy_std" not in atoms.calc.results  # one model: no spread


def test_calculator_on_a_periodic_box(checkpoints):
    """pbc=True: a molecule in a large box has its gas-phase energy and forces, and a water box
    (every atom within the cutoff of periodic images) its periodic energy, not the open one;
    an ensemble's spread comes with it."""
    calc = EKDCalculator.from_checkpoints([checkpoints["ani"], checkpoints["schnet"]])
    gas = rattled("CH3CHO")
    gas.calc = calc
    energy, forces = gas.get_potential_energy(), gas.get_forces()
    boxed = gas.copy()
    boxed.cell, boxed.pbc = [25.0, 25.0, 25.0], True
    boxed.wrap()
    boxed.calc = calc
    assert boxed.get_potential_energy() == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(boxed.get_forces(), forces, atol=1e-9)
    water = water_box()
    water.calc = calc
    periodic_energy = water.get_potential_energy()
    assert water.calc.results["forces_std"].shape == (len(water), 3)
    open_box = water.copy()
    open_box.pbc = False
    open_box.calc = calc
    assert abs(periodic_energy - open_box.get_potential_energy()) > 1e-3


def test_ensemble_mean_and_spread_equal_the_members(checkpoints, tmp_path):
    paths = [checkpoints["ani"], checkpoints["schnet"], checkpoints["ani1x"]]
    atoms = rattled("CH3CHO")
    members = []
    for path in paths:  # each member on its own, from its checkpoint
        energy, forces = model_energy_forces(path, atoms)
        members.append((energy * HARTREE_TO_EV, forces * HARTREE_TO_EV))
    energies = np.array([e for e, _ in members])
    forces = np.stack([f for _, f in members])
    assert energies.std() > 1e-3  # the members differ, so the spread is tested
    calc = EKDCalculator.from_checkpoints(paths)
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(energies.mean(), rel=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), forces.mean(0), rtol=1e-9, atol=1e-12)
    assert calc.get_property("energy_std", atoms) == pytest.approx(energies.std(), rel=1e-9)
    std = calc.get_property("forces_std", atoms)
    assert std.shape == (len(atoms), 3)
    np.testing.assert_allclose(std, forces.std(0), rtol=1e-8, atol=1e-12)

    # a folder of runs gives the same ensemble as its checkpoints (each run's best.ckpt once)
    folder = EKDCalculator.from_checkpoints([paths[0].parents[1], paths[1].parents[1], paths[2]])
    assert folder.get_potential_energy(atoms.copy()) == pytest.approx(energies.mean(), rel=1e-12)


def test_bfgs_relaxation_lowers_the_energy(checkpoints):
    atoms = rattled("CH3CH2OH", stdev=0.1)
    atoms.calc = EKDCalculator.from_checkpoint(checkpoints["ani"], num_threads=1)
    start_energy, start_fmax = atoms.get_potential_energy(), np.abs(atoms.get_forces()).max()
    BFGS(atoms, logfile=None).run(fmax=0.05, steps=200)
    fmax = np.linalg.norm(atoms.get_forces(), axis=1).max()
    assert atoms.get_potential_energy() < start_energy - 0.05  # eV
    assert fmax < 0.05 < start_fmax


def test_short_md_conserves_energy(checkpoints):
    atoms = molecule("CH3OH")
    atoms.calc = EKDCalculator.from_checkpoint(checkpoints["ani"], num_threads=1)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    start = atoms.positions.copy()
    totals = []
    dyn = VelocityVerlet(atoms, 0.25 * ase.units.fs)
    dyn.attach(lambda: totals.append(atoms.get_total_energy()), interval=5)
    dyn.run(100)
    assert np.abs(atoms.positions - start).max() > 0.01  # it moved
    assert np.ptp(totals) < 2e-3 * len(atoms)  # eV: NVE with exact forces conserves energy


# --------------------------------------------------------------------------- ekd-predict
def write_frames(path: Path) -> list[Atoms]:
    frames = [rattled("CH4", seed=2), rattled("CH3OH", seed=3), rattled("CH3CH2OH", seed=4)]
    ase.io.write(path, frames)
    return ase.io.read(path, ":")  # positions as written (8 decimals)


def test_predict_matches_the_calculator_on_every_frame(checkpoints, tmp_path, capsys):
    frames = write_frames(tmp_path / "in.xyz")
    out = tmp_path / "out.extxyz"
    assert predict_main([str(checkpoints["ani"]), str(tmp_path / "in.xyz"), "--out", str(out)]) == 0
    assert "wrote 3 structure(s)" in capsys.readouterr().out
    results = ase.io.read(out, ":")
    assert len(results) == 3
    calc = EKDCalculator.from_checkpoint(checkpoints["ani"])
    for atoms, result in zip(frames, results, strict=True):
        np.testing.assert_allclose(result.positions, atoms.positions, atol=1e-8)
        atoms.calc = calc
        assert result.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
        np.testing.assert_allclose(result.get_forces(), atoms.get_forces(), atol=1e-7)
        hartree, forces = model_energy_forces(checkpoints["ani"], atoms)  # Hartree, Hartree/Å
        assert result.info["energy_hartree"] == pytest.approx(hartree, rel=1e-12)
        assert result.get_potential_energy() == pytest.approx(hartree * 27.211386, rel=1e-6)  # eV
        np.testing.assert_allclose(result.get_forces(), forces * 27.211386, rtol=1e-6, atol=1e-7)
        assert "energy_std" not in result.info and "forces_std" not in result.arrays


def test_predict_ensemble_writes_the_spread(checkpoints, tmp_path):
    frames = write_frames(tmp_path / "in.extxyz")
    paths = [str(checkpoints["ani"]), str(checkpoints["schnet"])]
    out = tmp_path / "out.extxyz"
    assert predict_main([*paths, str(tmp_path / "in.extxyz"), "--out", str(out)]) == 0
    for atoms, result in zip(frames, ase.io.read(out, ":"), strict=True):
        (e1, f1), (e2, f2) = (model_energy_forces(p, atoms) for p in paths)
        assert result.get_potential_energy() == pytest.approx((e1 + e2) / 2 * HARTREE_TO_EV, rel=1e-12)
        assert result.info["energy_std"] == pytest.approx(abs(e1 - e2) / 2 * HARTREE_TO_EV, rel=1e-9)
        np.testing.assert_allclose(result.arrays["forces_std"],
                                   np.abs(f1 - f2) / 2 * HARTREE_TO_EV, atol=1e-7)


WATER_SDF = """water
  made by hand

  3  2  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.1193 O   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000    0.7632   -0.4770 H   0  0  0  0  0  0  0  0  0  0  0  0
    0.0000   -0.7632   -0.4770 H   0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
  1  3  1  0
M  END
$$$$
"""


def test_predict_reads_sdf(checkpoints, tmp_path):
    (tmp_path / "water.sdf").write_text(WATER_SDF)
    out = tmp_path / "water.extxyz"
    assert predict_main([str(checkpoints["ani"]), str(tmp_path / "water.sdf"), "--out", str(out)]) == 0
    result = ase.io.read(out)
    assert result.get_chemical_symbols() == ["O", "H", "H"]
    expected, _ = model_energy_forces(checkpoints["ani"], result)
    assert result.info["energy_hartree"] == pytest.approx(expected, rel=1e-12)


def one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("ekd-predict: error: ") and "\n" not in err, err
    for name in names:
        assert name in err, err
    return err


def test_predict_errors_are_one_line(checkpoints, tmp_path, capsys):
    ckpt = str(checkpoints["ani"])
    garbage = tmp_path / "broken.xyz"
    garbage.write_text("three\nnot a comment\nC 0 0\n")
    assert predict_main([ckpt, str(garbage), "--out", str(tmp_path / "o.extxyz")]) == 2
    one_line_error(capsys, str(garbage), "ASE cannot read")

    sulphur = tmp_path / "h2s.xyz"
    ase.io.write(sulphur, [molecule("CH4"), molecule("SH2")])
    assert predict_main([ckpt, str(sulphur), "--out", str(tmp_path / "o.extxyz")]) == 2
    one_line_error(capsys, str(sulphur), "structure 1 (H2S)", "['S']")

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert predict_main([str(bad), str(sulphur), "--out", str(tmp_path / "o.extxyz")]) == 2
    one_line_error(capsys, str(bad), "cannot read checkpoint")
    assert not (tmp_path / "o.extxyz").exists()


# --------------------------------------------------------------------------- ekd-export
PLAIN_TORCH_CHECK = """
import json, sys
import numpy as np
import torch

cases = json.load(open(sys.argv[1]))
for case in cases:
    model = torch.jit.load(case["file"])
    assert model.elements == ["H", "C", "N", "O"] and model.energy_unit == "Hartree"
    for mol in case["molecules"]:
        z = torch.tensor(mol["numbers"])
        pos = torch.tensor(mol["positions"], dtype=torch.float32, requires_grad=True)
        energy = model(z, pos)  # Hartree, forces by autograd
        (grad,) = torch.autograd.grad(energy, pos)
        e, forces = model.energy_and_forces(z, pos)
        scale = max(1e-3, float(np.abs(mol["forces"]).max()))
        # float32 rounding: about 1e-8 Hartree and 1e-7 of the largest force here
        np.testing.assert_allclose(float(energy), mol["energy"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(float(e), mol["energy"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(-grad.numpy(), mol["forces"], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(forces.numpy(), mol["forces"], rtol=0, atol=1e-5 * scale)
    try:
        model(torch.tensor([1, 16]), torch.zeros(2, 3))
        raise AssertionError("sulphur accepted")
    except torch.jit.Error as exc:
        assert "not among this model's elements" in str(exc)
for package in ("ekd_lightning", "pytorch_lightning", "lightning", "torch_geometric", "hydra", "e3nn",
                "mace"):
    assert package not in sys.modules, package
print("checked", sum(len(c["molecules"]) for c in cases))
"""


def export_molecules(seed: int = 0) -> list[Atoms]:
    """Compositions the export must handle: each element alone or missing, 1 to 60 atoms."""
    rng = np.random.default_rng(seed)
    # rattled by 0.01 Å: at an exactly symmetric geometry ViSNet's gated head takes the norm of a
    # vector feature that is zero by symmetry, so its force there is float rounding noise
    # (2e-4 Hartree/Å on CH4's carbon in float32, 0 in float64), in the model as in the export
    mols = [rattled(n, stdev=0.01) for n in ("H2", "CH4", "H2O", "NH3", "HCOOH", "CH3CONH2")]
    mols += [Atoms("H"), Atoms("C2", positions=[[0, 0, 0], [0, 0, 1.3]]), rattled("CH3CH2OH")]
    cluster = Atoms()  # 60 atoms of H, C, N and O, packed at random, at least 1 Å apart
    while len(cluster) < 60:
        trial = rng.uniform(0, 8, 3)
        if len(cluster) == 0 or np.linalg.norm(cluster.positions - trial, axis=1).min() > 1.0:
            cluster += Atoms([rng.choice(["H", "C", "N", "O"])], positions=[trial])
    return [*mols, cluster]


def test_export_runs_in_plain_torch_for_any_composition(checkpoints, tmp_path):
    cases = []
    for name, path in checkpoints.items():
        out = tmp_path / f"{name}.pt"
        assert export_main([str(path), str(out), "--format", "torchscript"]) == 0
        molecules = []
        for atoms in export_molecules():
            energy, forces = model_energy_forces(path, atoms, torch.float32)  # as trained
            molecules.append({"numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist(),
                              "energy": energy, "forces": forces.tolist()})
        cases.append({"file": str(out), "molecules": molecules})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "check.py").write_text(PLAIN_TORCH_CHECK)
    run = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(tmp_path / "cases.json")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"checked {len(checkpoints) * len(export_molecules())}" in run.stdout


def test_export_refuses_a_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage")
    assert export_main([str(bad), str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ekd-export: error: ") and str(bad) in err and "\n" not in err
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_calculator_and_export_on_a_gpu_match_the_cpu(checkpoints, tmp_path):
    atoms = rattled("CH3CH2OH")
    cpu = EKDCalculator.from_checkpoint(checkpoints["ani"])
    gpu = EKDCalculator.from_checkpoint(checkpoints["ani"], device="cuda")
    assert gpu.get_potential_energy(atoms.copy()) == pytest.approx(
        cpu.get_potential_energy(atoms.copy()), rel=1e-10)
    np.testing.assert_allclose(gpu.get_forces(atoms.copy()), cpu.get_forces(atoms.copy()), atol=1e-9)

    assert export_main([str(checkpoints["ani"]), str(tmp_path / "m.pt"), "--format", "torchscript"]) == 0
    z, pos = torch.tensor(atoms.numbers), torch.tensor(atoms.positions, dtype=torch.float32)
    e_cpu, f_cpu = torch.jit.load(tmp_path / "m.pt").energy_and_forces(z, pos)
    e_gpu, f_gpu = torch.jit.load(tmp_path / "m.pt", map_location="cuda").energy_and_forces(
        z.cuda(), pos.cuda())
    assert float(e_gpu) == pytest.approx(float(e_cpu), abs=1e-6)  # Hartree, float32 rounding
    np.testing.assert_allclose(f_gpu.cpu().numpy(), f_cpu.numpy(), atol=1e-5 * float(f_cpu.abs().max()))
