"""The ZBL pair repulsion prior (``model.repulsion: zbl``): its energy in Hartree, its smooth
switch-off at the sum of covalent radii, and that every path a model's energy takes carries it:
the model's forward and forces, the feature cache of energy-only training, the distillation
ensemble, the exported ports (TorchScript, metatomic in ASE) and the pipeline's runs of every
architecture."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase.build import molecule
from metatomic_ase import MetatomicCalculator
from omegaconf import OmegaConf

from ekd_lightning import EKDCalculator
from ekd_lightning.core.errors import ConfigError
from ekd_lightning.distill.ensemble import TeacherEnsemble
from ekd_lightning.inference.export import main as export_main
from ekd_lightning.inference.export import script_model
from ekd_lightning.models import instantiate_model
from ekd_lightning.models.base import energy_and_forces
from ekd_lightning.models.repulsion import ZBLRepulsion
from ekd_lightning.task.module import FeatureCache
from test_engines import assert_same, port_and_model, random_checkpoint
from test_models import ELEMENTS, MODEL_CONFIGS, TINY, build, flat, water_box
from test_pipeline import pipeline_cfg

HARTREE_EV, BOHR_ANGSTROM = 27.211386245988, 0.529177210903


def zbl_by_hand(z1: int, z2: int, r: float, cutoff: float) -> float:
    """ZBL in eV (LAMMPS pair_style zbl's formula, e²/4πε0 = 14.399645 eV·Å) times the p = 6
    polynomial envelope, converted to Hartree: an independent transcription."""
    a = 0.46850 / (z1 ** 0.23 + z2 ** 0.23)
    x = r / a
    phi = (0.18175 * math.exp(-3.19980 * x) + 0.50986 * math.exp(-0.94229 * x)
           + 0.28022 * math.exp(-0.40290 * x) + 0.02817 * math.exp(-0.20162 * x))
    u = r / cutoff
    env = 1 - 28 * u**6 + 48 * u**7 - 21 * u**8 if u < 1 else 0.0
    return 14.399645 * z1 * z2 / r * phi * env / HARTREE_EV


def with_prior(path, repulsion="zbl"):
    """The model of a config file (tiny, random, float64 as test_models builds it) with the prior."""
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    model = build(path)
    prior = instantiate_model({**{k: TINY.get(k, v) for k, v in cfg.items()}, "repulsion": repulsion},
                              ELEMENTS).double()
    prior.load_state_dict(model.state_dict())  # same weights: the prior is not in the state dict
    return model, prior


def compressed_ethanol():
    """Ethanol with its O-H bond squeezed from 0.97 to 0.6 Å and two H atoms 0.5 Å apart."""
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.02, seed=3)
    o, h = 2, 8  # ASE's CH3CH2OH: O is atom 2, its H atom 8
    assert atoms.get_chemical_symbols()[o] == "O" and atoms.get_chemical_symbols()[h] == "H"
    bond = atoms.positions[h] - atoms.positions[o]
    atoms.positions[h] = atoms.positions[o] + 0.6 * bond / np.linalg.norm(bond)
    atoms.positions[6] = atoms.positions[5] + [0.5, 0.0, 0.0]
    return atoms


def test_zbl_pair_energy_is_the_published_formula_in_hartree():
    zbl = ZBLRepulsion(ELEMENTS)
    species = {"H": 0, "C": 1, "N": 2, "O": 3}
    radii = {"H": 0.31, "C": 0.76, "N": 0.71, "O": 0.66}  # ASE's covalent radii, Å
    for (a, b), z in {("O", "H"): (8, 1), ("C", "C"): (6, 6), ("N", "H"): (7, 1)}.items():
        cutoff = radii[a] + radii[b]
        for r in (0.2, 0.5, 0.9 * cutoff, cutoff, 1.3 * cutoff):
            ours = zbl.pair_energies(torch.tensor([species[a]]), torch.tensor([species[b]]),
                                     torch.tensor([r], dtype=torch.float64))
            assert float(ours) == pytest.approx(zbl_by_hand(*z, r, cutoff), rel=1e-4, abs=1e-12)
    # bare Coulomb repulsion of the nuclei as r -> 0 (the unit: Hartree·Å = one Bohr radius)
    r = torch.tensor([1e-4], dtype=torch.float64)
    tiny = float(zbl.pair_energies(torch.tensor([3]), torch.tensor([0]), r)) * 1e-4
    assert tiny == pytest.approx(8 * BOHR_ANGSTROM, rel=2e-3)


def test_zbl_is_repulsive_and_switches_off_smoothly_at_the_covalent_distance():
    zbl = ZBLRepulsion(ELEMENTS)
    r = torch.linspace(0.2, 1.2, 2001, dtype=torch.float64, requires_grad=True)
    energy = zbl.pair_energies(torch.full_like(r, 3, dtype=torch.long),
                               torch.zeros_like(r, dtype=torch.long), r)
    (force,) = torch.autograd.grad(energy.sum(), r)
    inside = r.detach() < 0.97
    assert bool((energy[inside] > 0).all()) and bool((force[inside] < 0).all())
    assert bool((energy[~inside] == 0).all()) and bool((force[~inside] == 0).all())
    # value, slope and curvature vanish at the cutoff: E ~ (cutoff - r)^3, F ~ (cutoff - r)^2
    r = 0.97 - torch.tensor([1e-2, 1e-3], dtype=torch.float64, requires_grad=True)
    energy = zbl.pair_energies(torch.tensor([3, 3]), torch.tensor([0, 0]), r)
    (force,) = torch.autograd.grad(energy.sum(), r)
    energy = energy.detach()
    assert float(energy[1] / energy[0]) < 2e-3 and float(force[1] / force[0]) < 2e-2


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_every_model_adds_the_prior_to_its_energy_and_forces(config):
    model, prior = with_prior(config)
    atoms = compressed_ethanol()
    z, pos, batch = flat([atoms, molecule("H2O")], "cpu")
    plain_e, plain_f = energy_and_forces(model, z, pos, batch, 2)
    e, f = energy_and_forces(prior, z, pos, batch, 2)
    plain_e, e = plain_e.detach(), e.detach()
    zbl = ZBLRepulsion(ELEMENTS).double()
    species = model.species(z)
    expected = 0.0
    for i in range(len(atoms)):
        for j in range(i + 1, len(atoms)):
            r = torch.linalg.norm(pos[i] - pos[j]).reshape(1)
            expected += float(zbl.pair_energies(species[i:i + 1], species[j:j + 1], r))
    assert expected > 0.1  # Hartree: the squeezed pairs are well inside their cutoffs
    assert float(e[0] - plain_e[0]) == pytest.approx(expected, rel=1e-9)
    # water at equilibrium (O-H 0.969 Å, just inside the 0.97 Å switch-off): next to nothing
    assert float(e[1] - plain_e[1]) == pytest.approx(0.0, abs=1e-6)
    # forces are -dE/dx of the whole energy: central differences on the squeezed H atom
    h = 1e-5
    for axis in range(3):
        shifted = []
        for sign in (1, -1):
            p = pos.clone()
            p[8, axis] += sign * h
            with torch.no_grad():
                shifted.append(float(prior(z, p, batch, 2)[0]))
        assert float(f[8, axis]) == pytest.approx(-(shifted[0] - shifted[1]) / (2 * h), rel=1e-5, abs=1e-8)
    assert float((f - plain_f).abs().max()) > 0.1


class OneBatch:
    """A split of the two conformations of ``batch``, served as one batch (as PackedSplit)."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch.num_graphs

    def __getitems__(self, rows):
        return self.batch


def test_the_feature_cache_gives_the_prior_too():
    """Energy-only training reads cached AEVs: the prior, which depends on the positions, must
    still be added (else a teacher trained with the cache learns without the prior)."""
    _, prior = with_prior(next(p for p in MODEL_CONFIGS if p.stem == "ani2x"))
    prior = prior.float()
    z, pos, batch = flat([compressed_ethanol(), molecule("CH3OH")], "cpu", torch.float32)
    data = SimpleNamespace(z=z, pos=pos, batch=batch, num_graphs=2, mol=torch.tensor([0, 1]),
                           conf=torch.tensor([0, 0]))
    data.to = lambda device: data
    cache = FeatureCache(FeatureCache.SLAB_BYTES)
    cache.fill(prior, OneBatch(data), batch_size=2)  # held: AEVs and the prior's energies
    with torch.no_grad():
        direct = prior(z, pos, batch, 2)
        cached = cache.energies(prior, data)
    assert sorted(cache.priors) == [(0, 0), (1, 0)]  # held, not computed at every step
    # the prior here is above 0.1 Hartree: leaving it out would miss by far more than rounding
    np.testing.assert_allclose(cached.numpy(), direct.numpy(), rtol=0, atol=1e-5)


def test_the_distillation_ensemble_carries_the_prior():
    path = next(p for p in MODEL_CONFIGS if p.stem == "ani2x")
    members = [with_prior(path)[1] for _ in range(2)]
    z, pos, batch = flat([compressed_ethanol()], "cpu")
    energies, forces = TeacherEnsemble(members)(z, pos, batch, 1)
    for t, member in enumerate(members):
        e, f = energy_and_forces(member, z, pos, batch, 1)
        assert float(energies[t, 0]) == pytest.approx(float(e[0].detach()), rel=1e-12)
        np.testing.assert_allclose(forces[t].numpy(), f.numpy(), atol=1e-9)


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_the_exported_port_carries_the_prior(config):
    _, prior = with_prior(config)
    port = script_model(prior, config.stem)
    for atoms in (compressed_ethanol(), water_box(seed=4)):
        energy_error, force_error = port_and_model(port, prior, atoms)
        assert energy_error < 1e-10 and force_error < 1e-10, (energy_error, force_error)


def test_a_checkpoint_with_the_prior_exports_it_to_metatomic(tmp_path, capsys):
    path = next(p for p in MODEL_CONFIGS if p.stem == "ani2x")
    config = tmp_path / "ani2x_zbl.yaml"
    config.write_text(path.read_text() + "repulsion: zbl\n")
    checkpoint = random_checkpoint(config, tmp_path / "model.ckpt")
    out = tmp_path / "model.pt"
    assert export_main([str(checkpoint), str(out)]) == 0, capsys.readouterr().err
    calculator = EKDCalculator.from_checkpoint(checkpoint)
    assert calculator.members[0].repulsion is not None
    assert_same(compressed_ethanol(), MetatomicCalculator(out), calculator)


def test_the_pipeline_gives_every_architecture_the_prior(ani1x_file, comp6_file, tmp_path):
    from ekd_lightning.workflow.pipeline import teacher_jobs

    cfg, command = pipeline_cfg(ani1x_file, comp6_file, tmp_path, "+model.repulsion=zbl",
                                "model.activation_alpha=0.2")
    jobs = teacher_jobs(cfg, tmp_path, command)
    by_model = {job.spec.model: job.cfg["model"] for job in jobs}
    assert by_model["ani2x"]["repulsion"] == by_model["schnet_small"]["repulsion"] == "zbl"
    # other model keys still reach the pipeline's own model only
    assert by_model["ani2x"]["activation_alpha"] == 0.2 and "activation_alpha" not in by_model["schnet_small"]


def test_an_unknown_prior_is_a_config_error():
    with pytest.raises(ConfigError, match="model.repulsion='lj'.*zbl"):
        instantiate_model({"_target_": "ekd_lightning.models.ani.ANIModel", "repulsion": "lj"}, ELEMENTS)
