"""MD: the failure detector, stability runs (the ASE calculator: test_use_model.py)."""

import json
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT

from conftest import ANI, SCHNET
from ekd_lightning.analysis.md import (
    FAILURE_REASONS,
    EKDCalculator,
    StabilityCriteria,
    default_molecules,
    detect_failure,
    langevin_trajectory,
    molecules_from_records,
    nve_drift,
    run_stability,
    stability_table,
    summarize_stability,
)
from ekd_lightning.core.files import json_safe
from ekd_lightning.task.module import PotentialModule

ELEMENTS = ["H", "C", "N", "O"]
SAE = [-0.6, -38.1, -54.7, -75.2]


def make_module(name: str, seed: int = 0, scale: float = 0.01) -> PotentialModule:
    torch.manual_seed(seed)
    kwargs = ({"hidden": {e: [16] for e in ELEMENTS}} if name == "ani2x" else
              {"hidden_channels": 16, "num_filters": 16, "num_interactions": 1, "num_gaussians": 8})
    return PotentialModule({"_target_": ANI if name == "ani2x" else SCHNET, **kwargs}, ELEMENTS, SAE,
                           scale).eval()


# --------------------------------------------------------------------------- failure detector
def vibrating(name="CH3CH2OH", frames=20, amplitude=0.03, seed=0):
    """A made-up healthy trajectory: small random vibrations, flat energies (eV)."""
    atoms = molecule(name)
    rng = np.random.default_rng(seed)
    positions = atoms.positions + rng.normal(0, amplitude, (frames, len(atoms), 3))
    positions[0] = atoms.positions
    return atoms.numbers, positions, rng.normal(-100.0, 0.05, frames)


def test_detector_accepts_a_healthy_trajectory():
    numbers, positions, energies = vibrating()
    verdict = detect_failure(positions, energies, numbers)
    assert verdict == {"stable": True, "reason": None, "frame": None}
    # two waters drifting apart: not bonded at the start (O...H 1.9 Å), so not a broken bond
    dimer = molecule("H2O") + molecule("H2O")
    dimer.positions[3:] += [0.0, 0.0, 2.9]
    shift = np.array([[0, 0, 0]] * 3 + [[0, 0, 1]] * 3, dtype=float)
    apart = np.stack([dimer.positions + d * shift for d in (0.0, 3.0, 8.0)])
    assert detect_failure(apart, np.zeros(3), dimer.numbers)["stable"]


def test_detector_finds_a_broken_bond():
    numbers, positions, energies = vibrating()
    # ethanol atom 0 is C, bonded to H atoms; stretch one C-H bond to 2.2x from frame 6 on
    c, h = 0, next(i for i in range(len(numbers)) if numbers[i] == 1
                   and np.linalg.norm(positions[0, i] - positions[0, 0]) < 1.2)
    bond = positions[0, h] - positions[0, c]
    positions[6:, h] = positions[6:, c] + 2.2 * bond
    assert detect_failure(positions, energies, numbers) == {
        "stable": False, "reason": "bond_break", "frame": 6}
    assert detect_failure(positions, energies, numbers, StabilityCriteria(bond_break_factor=2.5))["stable"]


def test_detector_finds_a_collision():
    numbers, positions, energies = vibrating()
    positions[4:, 1] = positions[4:, 0] + [0.3, 0.0, 0.0]  # atom 1 into atom 0
    assert detect_failure(positions, energies, numbers) == {
        "stable": False, "reason": "collision", "frame": 4}


def test_detector_finds_energy_explosion_hole_and_nonfinite():
    numbers, positions, energies = vibrating()
    n = len(numbers)
    exploded = energies.copy()
    exploded[7:] = energies[0] + 1.5 * n  # +1.5 eV/atom
    assert detect_failure(positions, exploded, numbers) == {
        "stable": False, "reason": "energy_explosion", "frame": 7}
    assert detect_failure(positions, exploded, numbers, StabilityCriteria(max_energy_rise=2.0))["stable"]
    hole = energies.copy()
    hole[9:] = energies[0] - 1.2 * n
    assert detect_failure(positions, hole, numbers)["reason"] == "energy_hole"
    nan_energy = energies.copy()
    nan_energy[3] = np.nan
    assert detect_failure(positions, nan_energy, numbers) == {
        "stable": False, "reason": "nonfinite", "frame": 3}
    forces = np.zeros_like(positions)
    forces[5, 2, 1] = np.inf
    assert detect_failure(positions, energies, numbers, forces=forces)["frame"] == 5
    # the earliest failure wins
    both = exploded.copy()
    both[2] = np.nan
    assert detect_failure(positions, both, numbers)["frame"] == 2
    with pytest.raises(ValueError, match="one trajectory"):
        detect_failure(positions, energies[:-1], numbers)


def test_summary_counts_stable_runs_as_full_length():
    runs = [
        {"temperature_K": 300.0, "stable": True, "reason": None, "time_to_failure_fs": 200.0, "wall_s": 1.0},
        {"temperature_K": 300.0, "stable": False, "reason": "bond_break", "time_to_failure_fs": 50.0, "wall_s": 1.0},
        {"temperature_K": 600.0, "stable": False, "reason": "collision", "time_to_failure_fs": 20.0, "wall_s": 1.0},
        {"temperature_K": 600.0, "stable": False, "reason": "collision", "time_to_failure_fs": 10.0, "wall_s": 1.0},
    ]
    nve = [{"stable": True, "drift_meV_atom_ps": 2.0, "drift_fit_meV_atom_ps": 1.0, "wall_s": 0.5},
           {"stable": False, "drift_meV_atom_ps": math.nan, "drift_fit_meV_atom_ps": math.nan, "wall_s": 0.5}]
    row = summarize_stability("m", runs, nve)
    assert row["stable_fraction"] == 0.25
    assert row["stable_fraction_300K"] == 0.5 and row["stable_fraction_600K"] == 0.0
    assert row["mean_time_to_failure_fs"] == pytest.approx(70.0)
    assert row["failures"] == "bond_break:1;collision:2"
    assert row["nve_drift_meV_atom_ps"] == 2.0 and row["nve_failures"] == 1 and row["wall_s"] == 5.0


# --------------------------------------------------------------------------- MD runs
def test_langevin_run_with_a_random_model_is_reproducible():
    calculator = EKDCalculator(make_module("ani2x"), num_threads=1)
    atoms = molecule("CH3OH")
    first = langevin_trajectory(calculator, atoms, 600.0, seed=3, steps=40, check_every=10)
    again = langevin_trajectory(calculator, atoms, 600.0, seed=3, steps=40, check_every=10)
    assert {k: v for k, v in first.items() if k != "wall_s"} == {k: v for k, v in again.items() if k != "wall_s"}
    assert first["molecule"] == "CH4O" and first["n_atoms"] == 6 and first["steps"] == 40
    assert 0 < first["steps_run"] <= 40 and first["wall_s"] > 0
    if first["stable"]:
        assert first["reason"] is None and first["time_to_failure_fs"] == 20.0
    else:
        assert first["reason"] in FAILURE_REASONS and 0 <= first["time_to_failure_fs"] <= 20.0
    assert np.allclose(atoms.positions, molecule("CH3OH").positions)  # the input is not moved


def test_nve_drift_of_a_smooth_potential_is_small():
    row = nve_drift(EMT(), molecule("CH3OH"), temperature_K=300.0, steps=100)
    assert row["stable"] and row["drift_meV_atom_ps"] >= 0 and row["drift_fit_meV_atom_ps"] >= 0
    assert row["drift_fit_meV_atom_ps"] < 50.0


def test_stability_table_side_by_side(comp6_file, tmp_path):
    from ekd_lightning.data import read_molecules

    records, _ = read_molecules(comp6_file, "energies", "forces")
    molecules = molecules_from_records(records, max_molecules=1) + default_molecules(["CH3OH"])
    assert molecules[0].info["name"] == "gdb/mol00"
    rows = stability_table({"emt": EMT(), "random": make_module("schnet")}, molecules,
                           temperatures=(300.0, 600.0), seeds=(0,), steps=30, nve_steps=20,
                           out_dir=tmp_path)
    assert [r["model"] for r in rows] == ["emt", "random"]
    for row in rows:
        assert row["n_trajectories"] == 4 and 0.0 <= row["stable_fraction"] <= 1.0
        assert 0.0 <= row["mean_time_to_failure_fs"] <= 15.0
        assert {"stable_fraction_300K", "stable_fraction_600K", "nve_drift_meV_atom_ps"} <= set(row)
    saved = json.loads((tmp_path / "stability.json").read_text())
    assert len(saved["trajectories"]) == 8 and saved["criteria"]["bond_break_factor"] == 2.0
    emt_methanol = [t for t in saved["trajectories"] if t["model"] == "emt" and t["molecule"] == "CH3OH"]
    assert [t["stable"] for t in emt_methanol] == [True, True]
    assert [t["time_to_failure_fs"] for t in emt_methanol] == [15.0, 15.0]
    assert (tmp_path / "stability.csv").is_file() and (tmp_path / "stability_runs.csv").is_file()
    # run as one task per (model, molecule): the same rows, in the same order, as one run
    direct, _ = run_stability(EMT(), molecules, temperatures=(300.0, 600.0), seeds=(0,), steps=30,
                              nve_steps=20)
    emt_rows = [t for t in saved["trajectories"] if t["model"] == "emt"]

    def comparable(row):
        return {k: v for k, v in row.items() if k not in ("model", "wall_s")}

    assert [comparable(t) for t in emt_rows] == [comparable(json_safe(t)) for t in direct]


def test_stability_of_a_checkpoint_is_cached_beside_it(tmp_path, monkeypatch):
    import ekd_lightning.analysis.md as md

    module = make_module("ani2x")
    checkpoint = tmp_path / "run" / "best.ckpt"
    checkpoint.parent.mkdir()
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()},
               checkpoint)
    settings = dict(molecules=default_molecules(["CH3OH"]), temperatures=(300.0,), seeds=(0,),
                    steps=20, nve_steps=10)
    first = stability_table({"m": str(checkpoint)}, cache=True, **settings)
    assert len(list(checkpoint.parent.glob("md-*.json"))) == 1

    def not_again(*args, **kwargs):
        raise AssertionError("run again although cached")

    monkeypatch.setattr(md, "run_stability", not_again)
    again = stability_table({"m": str(checkpoint)}, cache=True, **settings)
    assert again == first  # the wall time too: these are the saved rows
    with pytest.raises(AssertionError, match="run again"):  # other settings: not cached
        stability_table({"m": str(checkpoint)}, cache=True, **{**settings, "steps": 30})
    with pytest.raises(AssertionError, match="run again"):  # cache off
        stability_table({"m": str(checkpoint)}, **settings)


def test_unknown_element_is_a_clear_error():
    calculator = EKDCalculator(make_module("ani2x"))
    with pytest.raises(ValueError, match="not among this model's elements"):
        calculator.get_potential_energy(Atoms("SH2", positions=[[0, 0, 0], [1.3, 0, 0], [0, 1.3, 0]]))
