"""One suite every model passes (after nequip's ``BaseModelTests`` and torchani's device-expanded
cases): each model config found in ``conf/model/*.yaml`` (a new YAML file is
picked up with no edit here), on every device of the conftest ``device`` fixture, is checked for

- forces: F = -dE/dx equal central finite differences of the energy (float64);
- batching: a batch of molecules gives each molecule's energy and forces alone;
- invariances: energies invariant and forces equivariant under translation, rotation and
  permutation of the atoms;
- double backward: the parameter gradient of a force loss equals finite differences of the loss;
- precision: float32 energies and forces agree with float64 ones (same weights);
- periodic systems (pairs with their cell shifts given from outside, vesin's neighbour list): a
  molecule in a large periodic box has its gas-phase energy and forces; a water box is invariant
  under translation and wrapping of atoms across the cell; forces equal finite differences with
  periodic images; a cell narrower than the cutoff (an atom sees its own images) gives the
  energy of a supercell divided by its size (ViSNet refuses it with a clear error).

Models are built by :func:`build` alone, at tiny sizes where the config has the size keys.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from omegaconf import OmegaConf

import ekd_lightning.conf
from ekd_lightning.core.errors import DataError
from ekd_lightning.models import instantiate_model
from ekd_lightning.models.base import AtomisticModel, energy_and_forces
from ekd_lightning.models.neighbors import Pairs, periodic_pairs

MODEL_CONFIGS = sorted((Path(ekd_lightning.conf.__file__).parent / "model").glob("*.yaml"))
ELEMENTS = ("H", "C", "N", "O")
SELF_ENERGIES = (-0.6, -38.1, -54.7, -75.2)  # Hartree, about the real ones: large totals
ENERGY_SCALE = 0.05  # Hartree per unit of network output
TINY = {  # model-size keys a config may have -> the tiny value used here
    "hidden": {e: [16, 8] for e in ELEMENTS},
    "hidden_channels": 16, "num_filters": 16, "num_interactions": 2, "num_gaussians": 12,
}


def build(config: Path, dtype: torch.dtype = torch.float64, device: str = "cpu") -> AtomisticModel:
    """The model of a config file, for ``ELEMENTS``, with random weights (seeded; the same
    values in both dtypes), tiny sizes where the config has a key of ``TINY``, and nonzero self
    energies and energy scale (float64 buffers in both dtypes, as training builds them)."""
    cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    cfg = {k: TINY.get(k, v) for k, v in cfg.items()}
    torch.manual_seed(0)
    model = instantiate_model(cfg, ELEMENTS)
    with torch.no_grad():  # zero-initialised biases too: no parameter is a special point
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.set_energy_statistics(SELF_ENERGIES, ENERGY_SCALE)
    assert next(model.parameters()).dtype == torch.float32
    return (model.double() if dtype == torch.float64 else model).to(device)


@pytest.fixture(params=MODEL_CONFIGS, ids=lambda p: p.stem)
def config(request) -> Path:
    return request.param


def test_every_model_config_is_collected():
    assert {"ani1x", "ani2x", "schnet", "schnet_small", "visnet_small", "mace_small"} <= {p.stem for p in MODEL_CONFIGS}


def dimer() -> Atoms:
    """Methanol and water 5 Å apart as one entry: atom pairs on both sides of every cutoff."""
    water = molecule("H2O")
    water.positions += [5.0, 0.0, 0.0]
    return molecule("CH3OH") + water


def molecules(*names: str, seed: int = 0) -> list[Atoms]:
    """ASE molecules displaced randomly (0.05 Å, no symmetry left); ``"X"`` names a lone O atom
    (no neighbours), ``"dimer"`` :func:`dimer`. All are near the origin: they overlap in space."""
    rng = np.random.default_rng(seed)
    mols = []
    for name in names:
        special = {"X": lambda: Atoms("O", positions=[[0.0, 0.0, 0.0]]), "dimer": dimer}
        atoms = special[name]() if name in special else molecule(name)
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        mols.append(atoms)
    return mols


def flat(mols: list[Atoms], device: str, dtype=torch.float64) -> tuple[torch.Tensor, ...]:
    """Atomic numbers (n_atoms,), positions (n_atoms, 3) Å and molecule index of a flat batch."""
    z = torch.tensor(np.concatenate([m.numbers for m in mols]), device=device)
    pos = torch.tensor(np.concatenate([m.positions for m in mols]), dtype=dtype, device=device)
    sizes = torch.tensor([len(m) for m in mols], device=device)
    return z, pos, torch.repeat_interleave(torch.arange(len(mols), device=device), sizes)


def evaluate(model, z, pos, batch, num_molecules, **kwargs):
    return energy_and_forces(model, z, pos, batch, num_molecules, **kwargs)


def rotation(seed: int) -> torch.Tensor:
    """A random proper rotation (3, 3), float64."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q * torch.sign(torch.linalg.det(q))


def test_forces_equal_finite_differences_of_the_energy(config, device):
    model = build(config, device=device)
    mols = molecules("CH3OH", "NH3", "HCN")
    z, pos, batch = flat(mols, device)
    energies, forces = evaluate(model, z, pos, batch, len(mols))
    assert energies.dtype == torch.float64 and forces.shape == pos.shape
    # every coordinate displaced by +h and -h: 2 * 3n copies of the batch, evaluated at once
    n, h = pos.numel(), 1e-5
    displaced = pos.repeat(2 * n, 1, 1).view(2, n, n)
    displaced[0].diagonal().add_(h)
    displaced[1].diagonal().sub_(h)
    copies = 2 * n
    with torch.no_grad():
        e = model(z.repeat(copies), displaced.view(-1, 3),
                  (batch + len(mols) * torch.arange(copies, device=device).unsqueeze(1)).view(-1),
                  len(mols) * copies).view(2, n, len(mols)).sum(-1)
    numerical = -(e[0] - e[1]) / (2 * h)
    assert forces.abs().max() > 1e-3  # the check is not trivially met
    torch.testing.assert_close(forces.flatten(), numerical, rtol=1e-5,
                               atol=1e-6 * float(forces.abs().max()))


def test_batch_equals_each_molecule_alone(config, device):
    """Molecules with different elements (so different feature subsets), a lone atom and
    overlapping coordinates: together, in either order, as each alone."""
    model = build(config, device=device)
    mols = molecules("CH3CONH2", "CH4", "X", "dimer", "CH3CH2OH")
    alone = [evaluate(model, *flat([m], device), 1) for m in mols]
    for order in (list(range(len(mols))), list(range(len(mols)))[::-1]):
        energies, forces = evaluate(model, *flat([mols[i] for i in order], device), len(mols))
        torch.testing.assert_close(energies, torch.cat([alone[i][0] for i in order]),
                                   rtol=0, atol=1e-10)
        torch.testing.assert_close(forces, torch.cat([alone[i][1] for i in order]),
                                   rtol=0, atol=1e-10)


def test_translation_invariance(config, device):
    model = build(config, device=device)
    mols = molecules("CH3CONH2", "dimer")
    z, pos, batch = flat(mols, device)
    energies, forces = evaluate(model, z, pos, batch, len(mols))
    shift = torch.tensor([12.1, -3.7, 0.4], dtype=pos.dtype, device=device)
    moved_energies, moved_forces = evaluate(model, z, pos + shift, batch, len(mols))
    torch.testing.assert_close(moved_energies, energies, rtol=0, atol=1e-10)
    torch.testing.assert_close(moved_forces, forces, rtol=0, atol=1e-10)


def test_rotation_invariance(config, device):
    model = build(config, device=device)
    mols = molecules("CH3CONH2", "dimer")
    z, pos, batch = flat(mols, device)
    energies, forces = evaluate(model, z, pos, batch, len(mols))
    r = rotation(3).to(device)
    rotated_energies, rotated_forces = evaluate(model, z, pos @ r.T, batch, len(mols))
    torch.testing.assert_close(rotated_energies, energies, rtol=0, atol=1e-10)
    torch.testing.assert_close(rotated_forces, forces @ r.T, rtol=0, atol=1e-10)


def test_permutation_invariance(config, device):
    """Atoms shuffled within each molecule (the batch stays sorted): the same energies, and the
    forces follow their atoms."""
    model = build(config, device=device)
    mols = molecules("CH3CONH2", "dimer", "HCN")
    z, pos, batch = flat(mols, device)
    energies, forces = evaluate(model, z, pos, batch, len(mols))
    generator = torch.Generator().manual_seed(4)
    perm = torch.cat([
        torch.nonzero(batch.cpu() == b).squeeze(1)[torch.randperm(len(m), generator=generator)]
        for b, m in enumerate(mols)
    ]).to(device)
    permuted_energies, permuted_forces = evaluate(model, z[perm], pos[perm], batch[perm], len(mols))
    torch.testing.assert_close(permuted_energies, energies, rtol=0, atol=1e-10)
    torch.testing.assert_close(permuted_forces, forces[perm], rtol=0, atol=1e-10)


def test_force_loss_gradient_equals_finite_differences(config, device):
    """Double backward, as force training does it: the gradient of sum (F - target)² with
    respect to each parameter tensor, along a random direction, against central differences of
    the loss along it (float64)."""
    model = build(config, device=device)
    mols = molecules("CH3CONH2", "H2O")
    z, pos, batch = flat(mols, device)
    target = 0.05 * torch.randn(pos.shape, generator=torch.Generator().manual_seed(5),
                                dtype=pos.dtype).to(device)

    def loss() -> torch.Tensor:
        _, forces = evaluate(model, z, pos, batch, len(mols), create_graph=True)
        return (forces - target).square().sum()

    def central_difference(parameter: torch.Tensor, direction: torch.Tensor, h: float) -> float:
        with torch.no_grad():
            parameter.add_(h * direction)
            plus = float(loss())
            parameter.sub_(2 * h * direction)
            minus = float(loss())
            parameter.add_(h * direction)
        return (plus - minus) / (2 * h)

    loss().backward()
    generator = torch.Generator().manual_seed(6)
    checked, h = 0, 1e-5
    for name, parameter in model.named_parameters():
        if parameter.grad is None or not parameter.grad.any():  # e.g. absent elements
            continue
        direction = torch.randn(parameter.shape, generator=generator,
                                dtype=parameter.dtype).to(device)
        analytic = float((parameter.grad * direction).sum())
        # Richardson extrapolation of two central differences: error O(h^4), so a parameter
        # of strong curvature (ViSNet's last-layer biases) is not mistaken for a wrong gradient
        numeric = (4 * central_difference(parameter, direction, h / 2)
                   - central_difference(parameter, direction, h)) / 3
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), name
        checked += 1
    assert checked >= len(list(model.parameters())) // 2


def test_float32_agrees_with_float64(config, device):
    model64, model32 = build(config, device=device), build(config, torch.float32, device)
    mols = molecules("CH3CONH2", "dimer", "X", "CH4")
    z, pos, batch = flat(mols, device)
    energies64, forces64 = evaluate(model64, z, pos, batch, len(mols))
    energies32, forces32 = evaluate(model32, z, pos.float(), batch, len(mols))
    assert energies32.dtype == torch.float64 and forces32.dtype == torch.float32
    # energies are summed in float64 (totals of -100s of Hartree keep float32-precise parts)
    torch.testing.assert_close(energies32, energies64, rtol=0, atol=1e-5 * ENERGY_SCALE)
    torch.testing.assert_close(forces32.double(), forces64, rtol=0,
                               atol=1e-4 * float(forces64.abs().max()))


def water_box(seed: int = 0, repeats=(2, 2, 2), spacing: float = 3.3) -> Atoms:
    """Water molecules on a grid ``spacing`` Å apart, turned and displaced at random, in a
    periodic cell of ``repeats * spacing`` Å (2 x 2 x 2: 24 atoms, 6.6 Å, near liquid density)."""
    rng = np.random.default_rng(seed)
    box = Atoms(cell=np.diag(np.array(repeats) * spacing), pbc=True)
    for point in np.ndindex(*repeats):
        water = molecule("H2O")
        water.rotate(rng.uniform(0, 360), "z")
        water.rotate(rng.uniform(0, 360), "x")
        water.positions += np.array(point) * spacing + rng.normal(0.0, 0.05, (3, 3))
        box += water
    return box


def periodic(model, atoms: Atoms, device: str, dtype=torch.float64, **kwargs):
    """Energy (1,) Hartree and forces (n_atoms, 3) of a periodic ``atoms``, its pairs from
    vesin's neighbour list (with cell shifts) within the model's cutoff."""
    z, pos, batch = flat([atoms], device, dtype)
    cell = torch.tensor(atoms.cell.array, dtype=dtype, device=device)[None]
    pbc = torch.tensor(atoms.pbc, device=device)[None]
    pairs = periodic_pairs(pos, batch, cell, pbc, model.cutoff)
    return evaluate(model, z, pos, batch, 1, pairs=pairs, **kwargs)


def test_molecule_in_a_large_periodic_box_gives_its_gas_phase_energy(config, device):
    model = build(config, device=device)
    (mol,) = molecules("dimer")
    gas_energy, gas_forces = evaluate(model, *flat([mol], device), 1)
    mol.cell, mol.pbc = np.diag([30.0, 31.0, 32.0]), True
    before = mol.positions.copy()
    mol.wrap()  # atoms on both sides of the cell: their pairs cross its faces
    assert (mol.positions - before).max() > 25.0
    energy, forces = periodic(model, mol, device)
    torch.testing.assert_close(energy, gas_energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(forces, gas_forces, rtol=0, atol=1e-10)


def test_water_box_invariant_under_translation_and_wrapping(config, device):
    model = build(config, device=device)
    box = water_box()
    energy, forces = periodic(model, box, device)
    moved = box.copy()
    moved.positions += [2.9, -1.3, 0.7]
    moved.wrap()
    moved.positions[5] += box.cell[1] - 2 * box.cell[2]  # an atom two images away
    moved_energy, moved_forces = periodic(model, moved, device)
    assert not np.allclose(moved.positions, box.positions)
    torch.testing.assert_close(moved_energy, energy, rtol=0, atol=1e-10)
    torch.testing.assert_close(moved_forces, forces, rtol=0, atol=1e-10)


def test_periodic_forces_equal_finite_differences(config, device):
    """Central differences of the energy of the water box along 8 of its coordinates, each
    evaluated with the neighbour list of the displaced box (Richardson-extrapolated, as in
    :func:`test_force_loss_gradient_equals_finite_differences`)."""
    model = build(config, device=device)
    box = water_box(seed=1)
    _, forces = periodic(model, box, device)
    assert forces.abs().max() > 1e-3

    def central_difference(atom: int, axis: int, h: float) -> float:
        energies = []
        for step in (h, -h):
            displaced = box.copy()
            displaced.positions[atom, axis] += step
            energies.append(float(periodic(model, displaced, device)[0][0].detach()))
        return -(energies[0] - energies[1]) / (2 * h)

    for flat_index in np.random.default_rng(2).choice(len(box) * 3, 8, replace=False):
        atom, axis = divmod(int(flat_index), 3)
        h = 1e-4
        numerical = (4 * central_difference(atom, axis, h / 2) - central_difference(atom, axis, h)) / 3
        assert float(forces[atom, axis]) == pytest.approx(
            numerical, rel=1e-5, abs=1e-6 * float(forces.abs().max()))


def test_cell_narrower_than_the_cutoff_equals_a_supercell(config, device):
    """Two waters in a cell 3.3 Å wide along x: each atom sees its own periodic images. The
    energy is half that of the cell doubled along x, and the forces repeat; ViSNet (whose
    torch-geometric layers take an atom's own image for a self loop) refuses with DataError."""
    model = build(config, device=device)
    cell = water_box(seed=3, repeats=(1, 2, 1))
    if "visnet" in OmegaConf.load(config)["_target_"].lower():
        with pytest.raises(DataError, match="own periodic image"):
            periodic(model, cell, device)
        return
    energy, forces = periodic(model, cell, device)
    double_energy, double_forces = periodic(model, cell.repeat((2, 1, 1)), device)
    torch.testing.assert_close(double_energy, 2 * energy, rtol=0, atol=1e-9)
    torch.testing.assert_close(double_forces, forces.repeat(2, 1), rtol=0, atol=1e-10)


def test_given_pairs_of_a_molecule_equal_its_own(config, device):
    """A molecule's own pairs given as a neighbour list in another order (reversed, zero
    shifts, plus pairs beyond the cutoff) give the energy and forces the model finds alone."""
    model = build(config, device=device)
    mols = molecules("CH3CONH2", "dimer")
    z, pos, batch = flat(mols, device)
    energies, forces = evaluate(model, z, pos, batch, len(mols))
    i, j = torch.triu_indices(len(z), len(z), 1, device=device)
    same = batch[i] == batch[j]
    edge_index = torch.cat([torch.stack([i, j]), torch.stack([j, i])], 1)[:, torch.cat([same, same])]
    pairs = Pairs(edge_index.flip(1), torch.zeros(edge_index.shape[1], 3, dtype=pos.dtype,
                                                  device=device))
    given_energies, given_forces = evaluate(model, z, pos, batch, len(mols), pairs=pairs)
    torch.testing.assert_close(given_energies, energies, rtol=0, atol=1e-10)
    torch.testing.assert_close(given_forces, forces, rtol=0, atol=1e-10)


def test_building_a_mace_model_leaves_torch_load_safe(tmp_path):
    """mace-torch sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 for the process on import, which makes
    every later ``torch.load`` unpickle arbitrary objects. After building a MACE model (a fresh
    process, so mace is imported here) the variable is unset and ``torch.load`` still refuses
    a pickled object."""
    import subprocess
    import sys

    code = """
import os, pickle, torch
from ekd_lightning.models.mace import MACEModel
MACEModel()
assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
torch.save({"obj": pickle.loads(pickle.dumps(os.sep)), "cls": pickle.PickleError}, "x.pt")
try:
    torch.load("x.pt")
except pickle.UnpicklingError:
    print("refused")
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("refused"), run.stderr[-2000:]
