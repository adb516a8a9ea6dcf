"""Trained models in the engines users run: ``ekd-export``'s metatomic model in ASE
(metatomic-ase), on molecules and on a periodic water box, for every model config and for an
ensemble, against :class:`~ekd_lightning.EKDCalculator`; a trained model in torch-sim (0.3)
batched MD through :class:`~ekd_lightning.inference.torchsim_model.EKDTorchSimModel`.

Export models are random (tiny sizes, as :mod:`test_models` builds them) saved in the
checkpoint layout; the torch-sim model is trained with the Lightning Trainer (seconds). Each
architecture's scriptable port (``export.ExportedANI``, ``ExportedSchNet``, ``ExportedViSNet``)
is also checked alone against the model it was made from, in float64.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from metatomic_ase import MetatomicCalculator
from omegaconf import OmegaConf

from conftest import train_tiny
from ekd_lightning import EKDCalculator
from ekd_lightning.inference.export import main as export_main
from ekd_lightning.inference.export import script_model
from ekd_lightning.inference.metatomic_model import ModelOutput
from ekd_lightning.models.base import energy_and_forces
from ekd_lightning.models.neighbors import periodic_pairs
from ekd_lightning.task.module import PotentialModule
from test_models import (
    ELEMENTS,
    ENERGY_SCALE,
    MODEL_CONFIGS,
    SELF_ENERGIES,
    TINY,
    build,
    flat,
    molecules,
    water_box,
)


def random_checkpoint(config: Path, path: Path, seed: int = 0) -> Path:
    """A checkpoint of the model of ``config`` (tiny sizes, random weights, nonzero self
    energies), as training writes one (hyper-parameters and state dict)."""
    cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    cfg = {k: TINY.get(k, v) for k, v in cfg.items()}
    torch.manual_seed(seed)
    module = PotentialModule(cfg, ELEMENTS, SELF_ENERGIES, ENERGY_SCALE).eval()
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def structures():
    """A molecule (open boundaries) and a periodic water box (atoms see periodic images)."""
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=1)
    return {"molecule": ethanol, "water box": water_box(seed=4)}


def assert_same(atoms, calc, reference, energy_rtol=1e-12, force_atol=1e-9):
    """Energy (eV) and forces (eV/Å) of ``atoms`` with ``calc`` equal those of ``reference``."""
    ours, theirs = atoms.copy(), atoms.copy()
    ours.calc, theirs.calc = calc, reference
    assert ours.get_potential_energy() == pytest.approx(theirs.get_potential_energy(),
                                                        rel=energy_rtol)
    forces = theirs.get_forces()
    assert np.abs(forces).max() > 1e-3
    np.testing.assert_allclose(ours.get_forces(), forces, rtol=0,
                               atol=force_atol * np.abs(forces).max())


def port_and_model(port, model, atoms) -> tuple[float, float]:
    """Largest differences |E_port - E_model| (Hartree) and |F_port - F_model| (Hartree/Å) on
    ``atoms``: a molecule (all pairs within the cutoff) or a periodic cell (vesin's list)."""
    z, pos, batch = flat([atoms], "cpu")
    pairs = None
    if atoms.pbc.any():
        pairs = periodic_pairs(pos, batch, torch.tensor(atoms.cell.array)[None],
                               torch.tensor(atoms.pbc)[None], model.cutoff)
    energy, forces = energy_and_forces(model, z, pos, batch, 1, pairs=pairs)
    if pairs is None:
        port_energy, port_forces = port.energy_and_forces(z, pos)
    else:
        pos = pos.detach().requires_grad_(True)
        i, j = pairs.edge_index
        vec = pos.index_select(0, j) - pos.index_select(0, i) + pairs.shifts
        port_energy = port.atomic_energies(port.species(z, pos), i, j, vec).sum()
        port_forces = -torch.autograd.grad(port_energy, pos)[0]
    assert float(forces.abs().max()) > 1e-3  # not trivially met
    return (abs(float(port_energy.detach()) - float(energy[0].detach())),
            float((port_forces - forces).abs().max()))


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_exported_port_equals_the_model(config):
    """Every model config: the scripted port (TorchScript) gives the model's energy and forces
    in float64 to rounding, on molecules (a lone atom; a dimer with pairs on both sides of the
    cutoff; ethanol) and on a periodic water box (pairs with their images given from outside)."""
    model = build(config)
    port = script_model(model, config.stem)
    for atoms in [*molecules("X", "dimer", "CH3CH2OH"), water_box(seed=4)]:
        if len(atoms) == 1:  # no pairs: self energy plus the network's output for the element
            z, pos, batch = flat([atoms], "cpu")
            with torch.no_grad():
                assert float(port(z, pos)) == pytest.approx(float(model(z, pos, batch, 1)[0]),
                                                            rel=0, abs=1e-12)
            continue
        energy_error, force_error = port_and_model(port, model, atoms)
        assert energy_error < 1e-10 and force_error < 1e-12, (energy_error, force_error)


def test_exported_visnet_refuses_an_atom_seeing_its_own_image():
    """As the model does (test_models), ViSNet's port refuses a cell narrower than its cutoff."""
    model = build(next(c for c in MODEL_CONFIGS if c.stem == "visnet_small"))
    narrow = water_box(seed=3, repeats=(1, 2, 1))  # 3.3 Å along x, cutoff 4.5 Å
    z, pos, batch = flat([narrow], "cpu")
    pairs = periodic_pairs(pos, batch, torch.tensor(narrow.cell.array)[None],
                           torch.tensor(narrow.pbc)[None], model.cutoff)
    i, j = pairs.edge_index
    port = script_model(model, "visnet_small")
    with pytest.raises(torch.jit.Error, match="own periodic image"):
        port.atomic_energies(port.species(z, pos), i, j, pos[j] - pos[i] + pairs.shifts)


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_metatomic_export_in_ase_equals_the_calculator(config, tmp_path, capsys):
    """Every model config: the exported file in metatomic-ase gives EKDCalculator's energies
    and forces on a molecule and on a periodic box (float64: to rounding)."""
    checkpoint = random_checkpoint(config, tmp_path / "model.ckpt")
    out = tmp_path / "model.pt"
    assert export_main([str(checkpoint), str(out)]) == 0, capsys.readouterr().err
    for atoms in structures().values():
        assert_same(atoms, MetatomicCalculator(out), EKDCalculator.from_checkpoint(checkpoint))


def test_float32_export_agrees_to_float32_precision(tmp_path):
    checkpoint = random_checkpoint(MODEL_CONFIGS[0], tmp_path / "model.ckpt")
    assert export_main([str(checkpoint), str(tmp_path / "m.pt"), "--dtype", "float32"]) == 0
    from metatomic.torch import load_atomistic_model

    assert load_atomistic_model(str(tmp_path / "m.pt")).capabilities().dtype == "float32"
    for atoms in structures().values():
        assert_same(atoms, MetatomicCalculator(tmp_path / "m.pt"),
                    EKDCalculator.from_checkpoint(checkpoint), energy_rtol=1e-6, force_atol=1e-4)


@pytest.mark.parametrize("stems", [("ani2x", "schnet_small", "ani1x"), ("ani2x", "ani1x", "visnet_small")],
                         ids=["ani+schnet", "ani+visnet"])
def test_ensemble_export_gives_the_mean_and_the_spread(stems, tmp_path):
    """Three members of two architectures (ANI with SchNet; ANI with ViSNet, as
    conf/ensemble/ani_visnet.yaml mixes them, cutoffs 5.2 and 4.5 Å): the exported mean energy
    and forces are the calculator's, ``energy_uncertainty`` its ``energy_std`` and
    ``energy_ensemble`` each member's energy, on the periodic box."""
    configs = [c for c in MODEL_CONFIGS if c.stem in stems]
    members = [random_checkpoint(c, tmp_path / f"{c.stem}.ckpt", seed=i)
               for i, c in enumerate(configs)]
    out = tmp_path / "ensemble.pt"
    assert export_main([*map(str, members), str(out)]) == 0
    reference = EKDCalculator.from_checkpoints(members)
    box = structures()["water box"]
    assert_same(box, MetatomicCalculator(out), reference)
    box.calc = reference
    box.get_potential_energy()
    calc = MetatomicCalculator(out)
    outputs = calc.run_model(box, {"energy_uncertainty": ModelOutput(unit="eV"),
                                   "energy_ensemble": ModelOutput(unit="eV")})
    spread = outputs["energy_uncertainty"].block().values.detach().numpy()
    assert spread.shape == (1, 1) and spread[0, 0] == pytest.approx(
        box.calc.results["energy_std"], rel=1e-9)
    each = outputs["energy_ensemble"].block().values.detach().numpy()[0]
    alone = [EKDCalculator.from_checkpoint(m).get_potential_energy(box.copy()) for m in members]
    np.testing.assert_allclose(each, alone, rtol=1e-12)


def test_export_format_torchscript_refuses_an_ensemble(tmp_path, capsys):
    checkpoint = random_checkpoint(MODEL_CONFIGS[0], tmp_path / "a.ckpt")
    code = export_main([str(checkpoint), str(checkpoint), str(tmp_path / "m.pt"),
                        "--format", "torchscript"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "ensemble needs --format metatomic" in err and "\n" not in err


@pytest.fixture(scope="module")
def trained(ani1x_file, tmp_path_factory) -> Path:
    """A tiny ANI trained on EMT energies and forces (seconds)."""
    return train_tiny(ani1x_file, tmp_path_factory.mktemp("engines") / "ani", "stage=oracle",
                      "loss.forces.weight=1.0", "trainer.max_epochs=3",
                      "model.hidden={H:[32],C:[32],N:[32],O:[32]}")


def solvated_systems():
    """A periodic water box and ethanol in a periodic 12 Å box, for one torch-sim batch."""
    ethanol = structures()["molecule"]
    ethanol.cell, ethanol.pbc = [12.0, 12.0, 12.0], True
    ethanol.positions += 6.0
    return [structures()["water box"], ethanol]


def test_torchsim_batch_equals_the_calculator_on_each_system(trained):
    import torch_sim as ts

    from ekd_lightning.inference.torchsim_model import EKDTorchSimModel

    model = EKDTorchSimModel([trained, trained], device="cpu")
    systems = solvated_systems()
    out = model(ts.initialize_state(systems, model.device, model.dtype))
    calc = EKDCalculator.from_checkpoint(trained)
    start = 0
    for index, atoms in enumerate(systems):
        atoms.calc = calc
        assert float(out["energy"][index]) == pytest.approx(atoms.get_potential_energy(), rel=1e-12)
        forces = out["forces"][start:start + len(atoms)].numpy()
        np.testing.assert_allclose(forces, atoms.get_forces(), rtol=0, atol=1e-9)
        start += len(atoms)
    assert out["energy_std"].shape == (2,) and float(out["energy_std"].abs().max()) < 1e-9


def test_torchsim_batched_nve_conserves_energy(trained):
    """torch-sim's NVE (velocity Verlet) on both systems at once, 40 steps of 0.5 fs from
    300 K: each system's total energy stays within 1 % of its kinetic energy, and atoms move."""
    import torch_sim as ts
    from torch_sim.units import MetalUnits

    from ekd_lightning.inference.torchsim_model import EKDTorchSimModel

    model = EKDTorchSimModel(trained, device="cpu")
    init, update = ts.nve(model=model, dt=torch.tensor(0.0005 * MetalUnits.time, dtype=torch.float64),
                          kT=torch.tensor(300 * MetalUnits.temperature, dtype=torch.float64), seed=0)
    state = init(ts.initialize_state(solvated_systems(), model.device, model.dtype))

    def total(s):
        kinetic = ts.calc_kinetic_energy(masses=s.masses, momenta=s.momenta, system_idx=s.system_idx)
        return s.energy + kinetic, kinetic

    start, kinetic = total(state)
    first = state.positions.clone()
    for _ in range(40):
        state = update(state)
    end, _ = total(state)
    assert float((state.positions - first).abs().max()) > 0.01
    assert bool(((end - start).abs() < 0.01 * kinetic).all()), (end - start, kinetic)


def test_metatomic_imports_after_the_models():
    """torch-geometric replaces torch.index_select with a wrapper TorchScript cannot compile;
    metatensor (metatomic-ase) scripts code calling it at import: a user who builds a model
    first (torch-geometric imported) then imports metatomic-ase must not get a crash."""
    import subprocess
    import sys

    code = ("import ekd_lightning.models.schnet, torch, torch_geometric\n"
            "assert torch.index_select is not torch._C._VariableFunctions.index_select\n"
            "import metatomic_ase\nprint('imported')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "imported" in run.stdout, run.stderr[-2000:]
