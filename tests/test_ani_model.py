"""ANI AEV and model: agreement with torchani's ANI-2x, features of absent elements, the AEV's
hand-written second derivatives. What every model must pass (finite-difference forces, batching,
invariances, double backward, float32) is in ``test_models.py``.

Only the tests comparing with torchani need it (the ``torchani`` fixture skips them without
the ``[ani]`` extra); the others run everywhere.
"""

import os

import h5py
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from conftest import SHARED_S66X8 as S66X8  # ../shared beside the checkout, or EKD_SHARED_DIR
from ekd_lightning.models.aev import ANIAEV, angular_triples
from ekd_lightning.models.ani import ANIModel
from ekd_lightning.models.base import energy_and_forces
from ekd_lightning.models.neighbors import neighbor_pairs

os.environ.setdefault("TORCHANI_NO_WARN_EXTENSIONS", "1")

ANI2X = ("H", "C", "N", "O", "S", "F", "Cl")
ASE_MOLECULES = ("CH3CH2OH", "C6H6", "CH3CONH2", "CH3SH", "CH3Cl", "CF4", "C2H6SO", "H2O")


def _ase(names=ASE_MOLECULES) -> list[Atoms]:
    return [molecule(name) for name in names]


@pytest.fixture(scope="module")
def torchani():
    """The torchani package (the ``[ani]`` extra), the reference these tests compare with."""
    return pytest.importorskip("torchani")


def _s66x8(num: int = 8) -> list[Atoms]:
    if not S66X8.exists():
        pytest.skip(f"{S66X8} not found")
    mols = []
    with h5py.File(S66X8, "r") as f:
        group = f["s66x8"]
        for name in sorted(group)[:: max(1, len(group) // num)][:num]:
            symbols = [s.decode() for s in group[name]["species"][()]]
            coordinates = group[name]["coordinates"][()]
            for conformer in (0, len(coordinates) - 1):  # shortest and longest dimer distance
                mols.append(Atoms(symbols, positions=coordinates[conformer].astype(np.float64)))
    return mols


def _flat(mols: list[Atoms], elements=ANI2X, dtype=torch.float64):
    """species index, atomic numbers, positions (Å), batch of a flat PyG-style batch."""
    species = torch.tensor(
        [elements.index(s) for m in mols for s in m.get_chemical_symbols()], dtype=torch.long
    )
    z = torch.tensor(np.concatenate([m.numbers for m in mols]), dtype=torch.long)
    pos = torch.tensor(np.concatenate([m.positions for m in mols]), dtype=dtype)
    batch = torch.repeat_interleave(torch.arange(len(mols)), torch.tensor([len(m) for m in mols]))
    return species, z, pos, batch


def _padded(mols: list[Atoms], elements=ANI2X, dtype=torch.float64):
    """torchani's padded layout: species index (-1 = padding) and coordinates (M, A, 3)."""
    width = max(len(m) for m in mols)
    species = torch.full((len(mols), width), -1, dtype=torch.long)
    coords = torch.zeros(len(mols), width, 3, dtype=dtype)
    for b, m in enumerate(mols):
        species[b, : len(m)] = torch.tensor([elements.index(s) for s in m.get_chemical_symbols()])
        coords[b, : len(m)] = torch.tensor(m.positions, dtype=dtype)
    return species, coords


def _torchani_2x():
    """A single ANI-2x member (random weights, zero self energies), assembled as torchani does."""
    from torchani.arch import Assembler

    asm = Assembler(periodic_table_index=True)
    asm.set_symbols(ANI2X)
    asm.set_global_cutoff_fn("cosine")
    asm.set_aev_computer(radial="ani2x", angular="ani2x", strategy="pyaev")
    asm.set_atomic_networks(ctor="ani2x")
    asm.set_neighborlist("all_pairs")
    asm.set_zeros_as_self_energies()
    return asm.assemble(1)


def _check_aev_against_torchani(torchani, mols: list[Atoms]) -> None:
    reference = torchani.aev.AEVComputer.like_2x()
    ours = ANIAEV.like_2x(7)
    assert ours.out_dim == reference.out_dim == 1008
    for dtype, atol in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
        padded_species, coords = _padded(mols, dtype=dtype)
        expected = reference.to(dtype)(padded_species, coords)[padded_species >= 0]
        species, _, pos, batch = _flat(mols, dtype=dtype)
        got = ours(species, pos, batch)
        assert got.dtype == dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_aev_matches_torchani_on_ase_molecules(torchani):
    _check_aev_against_torchani(torchani, _ase())


def test_aev_matches_torchani_on_s66x8(torchani):
    _check_aev_against_torchani(torchani, _s66x8())


def test_aev_sizes_and_triples():
    assert ANIAEV(4).out_dim == 4 * 16 + 10 * 32 == 384
    assert ANIAEV(7).out_dim == 1008
    _, _, pos, batch = _flat(_ase(("C6H6", "CH3CH2OH")))
    edge_index = neighbor_pairs(pos, batch, 3.5)
    p, q = angular_triples(edge_index[0], len(pos))
    counts = torch.bincount(edge_index[0], minlength=len(pos))
    assert len(p) == int((counts * (counts - 1) // 2).sum())
    assert bool((edge_index[0, p] == edge_index[0, q]).all()) and bool((p < q).all())
    assert len(set(zip(p.tolist(), q.tolist(), strict=True))) == len(p)


def test_layer_sizes_match_torchani_2x(torchani):
    reference = _torchani_2x().neural_networks
    model = ANIModel(ANI2X)
    for element in ANI2X:
        theirs = [p.shape for p in reference[element].parameters()]
        ours = [p.shape for p in model.networks[element].parameters()]
        assert ours == theirs, element
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )
    assert ANIModel().aev.out_dim == 384  # default H, C, N, O


def _copy_torchani_weights(model: ANIModel, reference) -> None:
    with torch.no_grad():
        for element in model.elements:
            theirs = reference.neural_networks[element]
            linears = [m for m in model.networks[element] if isinstance(m, torch.nn.Linear)]
            for ours, other in zip(linears, [*theirs.layers, theirs.final_layer], strict=True):
                ours.weight.copy_(other.weight)
                ours.bias.copy_(other.bias)


def test_energies_match_torchani_2x_with_copied_weights(torchani):
    torch.manual_seed(0)
    reference = _torchani_2x().double()
    model = ANIModel(ANI2X).double()
    _copy_torchani_weights(model, reference)
    mols = _ase()
    padded_species, coords = _padded(mols)
    numbers = torch.where(
        padded_species >= 0, torch.tensor([1, 6, 7, 8, 16, 9, 17])[padded_species], -1
    )
    expected = reference((numbers, coords)).energies
    _, z, pos, batch = _flat(mols)
    energies, forces = energy_and_forces(model, z, pos, batch, len(mols))
    torch.testing.assert_close(energies, expected, atol=1e-8, rtol=0)
    coords.requires_grad_(True)
    (grad,) = torch.autograd.grad(reference((numbers, coords)).energies.sum(), coords)
    torch.testing.assert_close(forces, -grad[padded_species >= 0], atol=1e-8, rtol=0)


def _random_model(elements=ANI2X) -> ANIModel:
    torch.manual_seed(1)
    model = ANIModel(elements).double()
    model.set_energy_statistics([-0.5 - i for i in range(len(elements))], 0.02)
    return model


def _force_loss(model: ANIModel, mols: list[Atoms], target: torch.Tensor,
                target_energies: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Energy plus force training loss in float64, Hartree units:
    sum (E - target_energies)² + sum (F - target)², target (n_atoms, 3) Hartree/Å."""
    _, z, pos, batch = _flat(mols)
    energies, forces = energy_and_forces(model, z, pos, batch, len(mols), create_graph=True)
    return (energies - target_energies).square().sum() + (forces - target).square().sum()


def _target_forces(mols: list[Atoms]) -> torch.Tensor:
    n_atoms = sum(len(m) for m in mols)
    return 0.05 * torch.randn(n_atoms, 3, generator=torch.Generator().manual_seed(5),
                              dtype=torch.float64)


def test_force_loss_weight_gradients_match_torchani(torchani):
    """Double backward: the weight gradient of a force loss equals torchani's (same weights,
    float64), layer by layer and element by element."""
    torch.manual_seed(0)
    reference = _torchani_2x().double()
    model = ANIModel(ANI2X).double()
    _copy_torchani_weights(model, reference)
    mols = _ase(("CH3CONH2", "CH3Cl", "H2O"))
    target = _target_forces(mols)
    _force_loss(model, mols, target).backward()

    padded_species, coords = _padded(mols)
    numbers = torch.where(
        padded_species >= 0, torch.tensor([1, 6, 7, 8, 16, 9, 17])[padded_species], -1
    )
    coords.requires_grad_(True)
    energies = reference((numbers, coords)).energies
    (grad,) = torch.autograd.grad(energies.sum(), coords, create_graph=True)
    forces = -grad[padded_species >= 0]
    (energies.square().sum() + (forces - target).square().sum()).backward()

    for element in ("H", "C", "N", "O", "Cl"):  # the elements present
        theirs = reference.neural_networks[element]
        ours = [m for m in model.networks[element] if isinstance(m, torch.nn.Linear)]
        for mine, other in zip(ours, [*theirs.layers, theirs.final_layer], strict=True):
            for name in ("weight", "bias"):
                expected = getattr(other, name).grad
                assert expected.abs().max() > 0, (element, name)
                torch.testing.assert_close(getattr(mine, name).grad, expected, rtol=1e-7,
                                           atol=1e-10 * float(expected.abs().max()))


def test_batches_without_some_elements_compute_only_their_features():
    """A 7-element model on H, C, N, O molecules multiplies only the 384 AEV features that can be
    nonzero; energies, forces and force-training gradients equal those of the full 1008."""
    aev = ANIAEV.like_2x(7).double()
    hcno = _ase(("CH3CH2OH", "CH3CONH2", "H2O"))
    species, z, pos, batch = _flat(hcno)
    restricted, compact, columns = aev.restricted((0, 1, 2, 3))
    full = aev(species, pos, batch)
    assert restricted.out_dim == 384 and bool((columns.diff() > 0).all())
    assert torch.equal(restricted(compact[species], pos, batch), full[:, columns])
    absent = torch.ones(aev.out_dim, dtype=torch.bool)
    absent[columns] = False
    assert not full[:, absent].any()

    def energies_forces_grads(mols):
        """Energies, forces of the first three molecules and the weight gradients of a force
        loss on them, the batch being ``mols``."""
        model = _random_model()
        _, z, pos, batch = _flat(mols)
        energies, forces = energy_and_forces(model, z, pos, batch, len(mols), create_graph=True)
        n = sum(len(m) for m in hcno)
        (energies[:3].square().sum() + forces[:n].square().sum()).backward()
        return energies[:3], forces[:n], model

    # with S, F and Cl in the batch every feature is computed: the reference
    reference = energies_forces_grads(hcno + _ase(("CH3SH", "CF4", "CH3Cl")))
    restricted_run = energies_forces_grads(hcno)
    assert list(restricted_run[2].aev._restricted) == [((0, 1, 2, 3), torch.device("cpu"))]
    torch.testing.assert_close(restricted_run[0], reference[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(restricted_run[1], reference[1], rtol=0, atol=1e-10)
    for got, expected in zip(restricted_run[2].parameters(), reference[2].parameters(), strict=True):
        if got.grad is None:  # the networks of S, F and Cl: no atoms
            continue
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-9, atol=1e-12)
    first_layer = restricted_run[2].networks["H"][0].weight.grad
    assert not first_layer[:, absent].any() and first_layer[:, columns].abs().sum() > 0


def test_hidden_sizes_of_unknown_elements_are_refused():
    with pytest.raises(ValueError, match="not in"):
        ANIModel(hidden={"S": [8]})
    assert ANIModel(hidden={"H": [8, 4]}).hidden["H"] == [8, 4]


def test_aev_hand_written_backward_and_double_backward_match_numerical():
    """The AEV's hand-written backward and double backward (force training) agree with finite
    differences in float64 (torch.autograd.gradcheck / gradgradcheck)."""
    aev = ANIAEV.like_2x().double()
    mols = _ase(("CH3OH", "H2O"))
    species, _, pos, batch = _flat(mols)
    pos = pos.double().requires_grad_(True)

    def features(p: torch.Tensor) -> torch.Tensor:
        return aev(species, p, batch)

    assert torch.autograd.gradcheck(features, (pos,), fast_mode=True)
    assert torch.autograd.gradgradcheck(features, (pos,), fast_mode=True)
