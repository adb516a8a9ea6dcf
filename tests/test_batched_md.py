"""Batched MD: the integrator (NVE drift, Langevin temperature), batched vs single forces,
failure at the right step, caching, h(r), structure files."""

import math

import numpy as np
import pytest
import torch
from ase import units
from ase.build import molecule

from conftest import ANI, SCHNET
from ekd_lightning import batched_md
from ekd_lightning.analysis.batched_md import (
    baoab_step,
    batched_stability_table,
    hr_counts,
    hr_error,
    kinetic_energy,
    load_members,
    make_replicas,
    potential,
    run_replicas,
    stability_runs_cached,
)
from ekd_lightning.analysis.md import default_molecules, molecules_from_file
from ekd_lightning.analysis.md import main as md_main
from ekd_lightning.core.errors import DataError
from ekd_lightning.core.units import HARTREE_TO_EV
from ekd_lightning.models.base import energy_and_forces
from ekd_lightning.task.module import PotentialModule

ELEMENTS = ["H", "C", "N", "O"]
SAE = [-0.6, -38.1, -54.7, -75.2]


class ElasticNetwork(torch.nn.Module):
    """A smooth test potential: springs (k Hartree/Å²) between every pair of atoms of each
    replica at the pair's length in ``atoms`` (all replicas are copies of that molecule)."""

    def __init__(self, atoms, k=0.3):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=torch.float64))
        self.n = len(atoms)
        self.i, self.j = np.triu_indices(self.n, k=1)
        pos = torch.as_tensor(atoms.positions)
        self.register_buffer("d0", (pos[self.i] - pos[self.j]).norm(dim=-1))

    def forward(self, z, pos, batch, num_molecules):
        x = pos.view(num_molecules, self.n, 3)
        d = (x[:, self.i] - x[:, self.j]).norm(dim=-1)
        return (0.5 * self.k * (d - self.d0) ** 2).sum(-1).double()


class Pull(torch.nn.Module):
    """A constant force (Hartree/Å) on atom 1 of every replica along a direction, both chosen by
    the replica's number of atoms: ``{n_atoms: (force, direction)}``."""

    def __init__(self, pulls):
        super().__init__()
        self.f = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
        self.register_buffer("u", torch.zeros(10, 3, dtype=torch.float64))
        with torch.no_grad():
            for n, (force, direction) in pulls.items():
                self.f[n], self.u[n] = force, torch.as_tensor(direction)

    def forward(self, z, pos, batch, num_molecules):
        counts = torch.bincount(batch, minlength=num_molecules)
        local = torch.arange(len(z)) - (torch.cumsum(counts, 0) - counts)[batch]
        n = counts[batch]
        energy = -self.f[n] * (pos.double() * self.u[n]).sum(-1) * (local == 1)
        return torch.zeros(num_molecules, dtype=torch.float64).index_add(0, batch, energy)


def test_nve_conserves_energy_on_a_smooth_model(device):
    atoms = molecule("CH3OH")
    out = run_replicas(ElasticNetwork(atoms).to(device), [atoms], [600.0], 8, 1000, timestep_fs=0.5,
                       friction_per_fs=0.0, check_every=50, record_every=10, keep_total_energy=True)
    assert all(r["stable"] for r in out["trajectories"])
    total = out["total_energy"] * 1000 / len(atoms)  # meV/atom, (8 replicas, 101 frames)
    kinetic_scale = 1.5 * units.kB * 600 * 1000  # meV/atom of kinetic energy at 600 K
    assert np.isfinite(total).all()
    # 0.5 ps of velocity Verlet at 0.5 fs: the total energy fluctuates (O(dt²)) within 3% of the
    # thermal energy and does not drift
    assert np.abs(total - total[:, :1]).max() < 0.03 * kinetic_scale
    drift = np.polyfit(np.arange(total.shape[1]) * 5e-3, total.T, 1)[0]  # meV/atom/ps per replica
    assert np.abs(drift).max() < 0.3


def test_langevin_thermostat_reaches_the_target_temperature(device):
    atoms = molecule("CH3OH")
    members = load_members(ElasticNetwork(atoms).to(device))  # on the model's device
    generator = torch.Generator(device=device).manual_seed(0)
    state, _ = make_replicas([atoms], [500.0], 64, generator)
    assert {t.device.type for t in (state.pos, state.vel, state.batch, state.kT)} == {device}
    assert next(members[0].parameters()).device.type == device
    energies, forces = potential(members, state.z, state.pos, state.batch, state.n)
    dt, friction = 0.5 * units.fs, 0.05 / units.fs
    samples = []
    for step in range(1200):
        energies, forces = baoab_step(
            state, forces, lambda pos: potential(members, state.z, pos, state.batch, state.n),
            dt, friction, generator)
        if step >= 200 and step % 4 == 0:
            samples.append(kinetic_energy(state))
    dof = 3 * len(atoms)  # the thermostat acts on every degree of freedom, centre of mass too
    temperature = 2 * torch.stack(samples).mean().item() / (dof * units.kB)
    # without the thermostat (NVE from 500 K at the minimum) equipartition gives ~250 K
    assert temperature == pytest.approx(500.0, rel=0.03)


@pytest.mark.parametrize("name", ["ani2x", "schnet"])
def test_batched_forces_equal_single_molecule_forces(name):
    torch.manual_seed(0)
    kwargs = ({"hidden": {e: [16] for e in ELEMENTS}} if name == "ani2x" else
              {"hidden_channels": 16, "num_filters": 16, "num_interactions": 1, "num_gaussians": 8})
    module = PotentialModule({"_target_": ANI if name == "ani2x" else SCHNET, **kwargs}, ELEMENTS, SAE,
                             0.01).eval()
    molecules = default_molecules(["CH3OH", "CH3CONH2"])
    state, rows = make_replicas(molecules, [300.0, 1000.0], 2, torch.Generator().manual_seed(1))
    state.pos += 0.05 * torch.randn(state.pos.shape, dtype=torch.float64)  # every replica differs
    members = load_members(module)
    energies, forces = potential(members, state.z, state.pos, state.batch, state.n)
    single = module.model.double()
    assert len(rows) == state.n == 8
    for r in range(state.n):
        atoms = state.batch == r
        e, f = energy_and_forces(single, state.z[atoms], state.pos[atoms],
                                 torch.zeros(int(atoms.sum()), dtype=torch.long), 1)
        assert energies[r].item() == pytest.approx(e.item() * HARTREE_TO_EV, rel=1e-12)
        torch.testing.assert_close(forces[atoms], f * HARTREE_TO_EV, rtol=1e-9, atol=1e-10)
    # the float32 path agrees to float32 precision
    e32, f32 = potential(load_members(module, torch.float32), state.z, state.pos, state.batch, state.n)
    torch.testing.assert_close(f32, forces, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("record_every", [1, 3])
def test_a_broken_bond_is_detected_at_the_right_step(record_every):
    ch4, water = default_molecules(["CH4", "H2O"])
    pulls = {len(a): (force, (a.positions[1] - a.positions[0]) / a.get_distance(0, 1))
             for a, force in ((ch4, 0.05), (water, 0.0025))}  # an H pulled off its bond, Hartree/Å
    out = run_replicas(Pull(pulls), [ch4, water], [0.0], 2, 300, timestep_fs=0.5,
                       friction_per_fs=0.0, check_every=10 * record_every, record_every=record_every)
    for atoms, (force, _) in zip((ch4, water), pulls.values(), strict=True):
        # at 0 K and a constant force, velocity Verlet is exact: the H moves a t² / 2 along the bond
        accel = force * HARTREE_TO_EV / atoms.get_masses()[1]  # Å per ASE time unit²
        t = np.arange(1, 301) * 0.5 * units.fs
        first = int(np.flatnonzero(0.5 * accel * t**2 > 0.5)[0]) + 1  # first step past 0.5 Å
        expected = math.ceil(first / record_every) * record_every  # first recorded frame past it
        rows = [r for r in out["trajectories"] if r["n_atoms"] == len(atoms)]
        assert [(r["stable"], r["reason"], r["steps_run"]) for r in rows] == [
            (False, "bond_deviation", expected)] * 2
        assert rows[0]["time_to_failure_fs"] == expected * 0.5
    # the water replicas break later: they ran on with their own forces after CH4 left the batch
    assert out["trajectories"][-1]["steps_run"] > out["trajectories"][0]["steps_run"] + 10 * record_every


def test_hr_error_is_zero_for_itself_and_large_for_another_geometry():
    a, b = molecule("CH3OH").positions[None], molecule("CH3CH2OH").positions[None]
    assert hr_error(hr_counts(a), hr_counts(a)) == 0.0
    assert 0.5 < hr_error(hr_counts(a), hr_counts(b)) <= 2.0
    assert math.isnan(hr_error(np.zeros(400), hr_counts(a)))


def test_stability_runs_of_a_checkpoint_are_cached(tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = PotentialModule({"_target_": ANI, "hidden": {e: [16] for e in ELEMENTS}}, ELEMENTS, SAE, 0.001)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    settings = dict(temperatures=[300.0], replicas=2, steps=8, record_every=2)
    first = stability_runs_cached(path, default_molecules(["CH3OH"]), **settings)
    def not_again(*args, **kwargs):
        raise AssertionError("ran again")

    monkeypatch.setattr(batched_md, "stability_runs", not_again)
    assert stability_runs_cached(path, default_molecules(["CH3OH"]), **settings) == first
    assert len(list(tmp_path.glob("md-batched-*.json"))) == 1
    with pytest.raises(AssertionError, match="ran again"):  # another setting is not reused
        stability_runs_cached(path, default_molecules(["CH3OH"]), **{**settings, "steps": 10})


def test_batched_table_writes_survival_and_hr_against_cached_xtb(tmp_path, monkeypatch):
    torch.manual_seed(0)
    models = {name: PotentialModule({"_target_": ANI, "hidden": {e: [8] for e in ELEMENTS}}, ELEMENTS, SAE,
                                    scale) for name, scale in (("baseline", 0.003), ("student", 1e-4))}
    kwargs = dict(molecules=default_molecules(["H2O"]), temperatures=[300.0, 600.0], replicas=3,
                  steps=40, reference="baseline", reference_steps=16,
                  reference_cache=tmp_path / "ref", record_every=2)
    rows, survival = batched_stability_table(models, out_dir=tmp_path / "md", **kwargs)
    assert [(s["model"], s["temperature"], s["n"]) for s in survival] == [
        (m, t, 6 if t == "all" else 3) for m in models for t in ("300K", "600K", "all")]
    student = {s["temperature"]: s for s in survival if s["model"] == "student"}
    assert 0 <= student["all"]["p_logrank"] <= 1 or math.isnan(student["all"]["p_logrank"])
    assert "difference_low" in student["300K"] and "p_logrank" not in survival[0]
    assert {"survival_300K", "survival_600K", "hr_error_300K", "p_logrank"} <= set(rows[1])
    assert all(0 <= r["hr_error_600K"] <= 2 for r in rows)
    for name in ("survival.csv", "survival.png", "stability.json", "stability_runs.csv"):
        assert (tmp_path / "md" / name).is_file()
    # the xTB reference runs once per molecule and temperature, then comes from the cache
    assert len(list((tmp_path / "ref").glob("xtb-*.npz"))) == 2
    monkeypatch.setattr("ase.md.langevin.Langevin.run", lambda *a: pytest.fail("xTB ran again"))
    again, _ = batched_stability_table(models, **kwargs)
    assert again[0]["hr_error_300K"] == rows[0]["hr_error_300K"]


def test_structures_come_from_any_ase_file(tmp_path, capsys):
    from ase.io import write

    path = tmp_path / "mols.xyz"
    write(path, [molecule("CH3OH"), molecule("H2O")])
    molecules = molecules_from_file(path)
    assert [a.info["name"] for a in molecules] == ["mols-0", "mols-1"]
    assert molecules[1].get_chemical_formula() == "H2O"
    bad = tmp_path / "bad.xyz"
    bad.write_text("not a structure\n")
    with pytest.raises(DataError, match="bad.xyz: cannot read structures"):
        molecules_from_file(bad)
    # ekd-md runs the file's molecules; an unreadable file is a one-line error naming it
    torch.manual_seed(0)
    module = PotentialModule({"_target_": ANI, "hidden": {e: [8] for e in ELEMENTS}}, ELEMENTS, SAE, 0.001)
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, checkpoint)
    args = ["--checkpoints", f"m={checkpoint}", "--temperatures", "300", "--seeds", "0",
            "--steps", "4", "--nve-steps", "0", "--out", str(tmp_path / "md")]
    assert md_main([*args, "--structures", str(path)]) == 0
    runs = (tmp_path / "md" / "stability_runs.csv").read_text()
    assert "mols-0" in runs and "mols-1" in runs and "CH3OH" not in runs
    assert md_main([*args, "--structures", str(bad)]) == 2
    assert "bad.xyz: cannot read structures" in capsys.readouterr().err


def test_batched_md_leaves_the_device_only_at_failure_checks(device, monkeypatch):
    """No host round trip per step: data leave the model's device once per failure check
    (every check_every steps), however many steps and recorded frames lie between checks."""
    atoms = molecule("CH3OH")
    model = ElasticNetwork(atoms).to(device)
    calls = []
    for name in ("cpu", "numpy", "tolist", "item"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            calls.append(self.device.type)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def transfers(steps):
        calls.clear()
        run_replicas(model, [atoms], [300.0], 2, steps, check_every=100, record_every=1)
        return len(calls)

    short, long = transfers(100), transfers(300)  # 1 and 3 checks; 200 more steps and frames
    assert 0 < long - short <= 2 * 12  # at most a dozen transfers per extra check
    assert short < 50


def test_a_start_structure_with_atoms_on_top_of_each_other_is_refused_before_any_step():
    """Batched MD checks its starting structures as ekd-md does: an H 0.01 Å from its O is a
    one-line DataError naming the structure, not a trajectory that "fails" at step 0
    (mutation: dropping the check lets the run start and report a failure)."""
    water = molecule("H2O")
    water.positions[1] = water.positions[0] + [0, 0, 0.01]
    with pytest.raises(DataError, match=r"starting structure H2O: atoms 0 \(O\) and 1 \(H\) are 0.010 Å"):
        run_replicas(ElasticNetwork(molecule("H2O")), [water], [300.0], 2, 8, record_every=4,
                     check_every=8)
