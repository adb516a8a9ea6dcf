"""MD judged against the reference: GFN2-xTB (tblite) under the same test, failure modes at the
failure frame with its geometry saved, the shared table of both MD paths, the best recipe."""

import csv
import math
import re

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.io import read

from conftest import ANI
from ekd_lightning.analysis import md_reference
from ekd_lightning.analysis.md import (
    FU_CRITERIA,
    StabilityCriteria,
    classify_failure,
    default_molecules,
    detect_failure,
)
from ekd_lightning.analysis.md import main as md_main
from ekd_lightning.analysis.md_reference import REFERENCE_NAME
from ekd_lightning.analysis.stability import stability_table
from ekd_lightning.task.module import PotentialModule

ELEMENTS = ["H", "C", "N", "O"]
SAE = [-0.6, -38.1, -54.7, -75.2]


def ethanol_failure(move):
    """Ethanol's start and a copy with ``move(positions)`` applied; the failure verdict."""
    atoms = molecule("CH3CH2OH")
    start = atoms.positions.copy()
    failed = start.copy()
    move(failed)
    verdict = detect_failure(np.stack([start, failed]), np.zeros(2), atoms.numbers, FU_CRITERIA)
    return atoms, start, failed, verdict


def test_failures_are_classified_at_the_failure_frame():
    atoms = molecule("CH3CH2OH")  # C0, C1, O2, H3 (on O), H4.. on carbons
    symbols = atoms.get_chemical_symbols()
    h_on_c = next(k for k in range(len(atoms)) if symbols[k] == "H" and atoms.get_distance(0, k) < 1.2)

    def stretch(p):  # one C-H bond 0.7 Å longer
        p[h_on_c] += 0.7 * (p[h_on_c] - p[0]) / np.linalg.norm(p[h_on_c] - p[0])

    def compress(p):  # the C-C bond 0.6 Å shorter (0.92 Å: no collision)
        p[1] -= 0.6 * (p[1] - p[0]) / np.linalg.norm(p[1] - p[0])

    o = symbols.index("O")
    h_on_o = next(k for k in range(len(atoms)) if symbols[k] == "H" and atoms.get_distance(o, k) < 1.1)
    c_of_o = min((0, 1), key=lambda c: atoms.get_distance(o, c))

    def transfer(p):  # the hydroxyl H hops onto the carbon beside the O (1.1 Å away, 2.3 Å from O)
        away = p[c_of_o] - p[o]
        p[h_on_o] = p[c_of_o] + 1.1 * away / np.linalg.norm(away)

    expected = {stretch: ("stretch", f"C0-H{h_on_c}:stretch"),
                compress: ("compression", "C0-C1:compression"),
                transfer: ("hydrogen_transfer", f"O{o}-H{h_on_o}:hydrogen_transfer>C{c_of_o}")}
    for move, (mode, bond) in expected.items():
        atoms, start, failed, verdict = ethanol_failure(move)
        assert not verdict["stable"] and verdict["frame"] == 1
        found = classify_failure(start, failed, atoms.numbers, verdict["reason"], FU_CRITERIA)
        assert found["failure_mode"] == mode
        assert bond in found["failure_bonds"].split(";")
    # an intact trajectory has nothing to classify; a failure without a bond keeps its reason
    assert classify_failure(start, start, atoms.numbers, None) == {"failure_mode": None, "failure_bonds": ""}
    assert classify_failure(start, start, atoms.numbers, "energy_explosion")["failure_mode"] == "energy_explosion"


class Repulsion(torch.nn.Module):
    """A broken potential: every pair of atoms pushed apart by a constant k Hartree/Å, so every
    trajectory stretches its bonds past 0.5 Å within tens of fs."""

    elements = ELEMENTS

    def __init__(self, k=0.05):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=torch.float64))

    def forward(self, z, pos, batch, num_molecules):
        same = batch[:, None] == batch[None, :]
        d = (pos[:, None] - pos[None, :] + torch.eye(len(z), dtype=pos.dtype)[..., None]).norm(dim=-1)
        pair = torch.where(same, d, torch.zeros_like(d)).sum(1) * 0.5
        return -self.k * torch.zeros(num_molecules, dtype=pos.dtype).index_add(0, batch, pair)


def random_models():
    return {"wild": Repulsion()}


@pytest.mark.parametrize("engine", ["batched", "ase"])
def test_models_are_judged_against_xtb_under_the_same_test(engine, tmp_path, monkeypatch):
    """GFN2-xTB runs as many trajectories as asked, with the models' criteria, steps and time
    step; each model's survival is log-rank tested against it per temperature and molecule; the
    failures are classified and saved as extxyz; the reference comes from its cache after."""
    counts = {"batched": {"replicas": 4}, "ase": {"seeds": (0, 1, 2, 3), "record_every": 2}}[engine]
    no_energy_hole = StabilityCriteria(max_bond_deviation=0.5, max_energy_drop=math.inf)
    kwargs = dict(molecules=default_molecules(["CH3OH"]), temperatures=[300.0], engine=engine,
                  steps=40, reference_replicas=4, reference_cache=tmp_path / "ref",
                  criteria=no_energy_hole, **counts)  # the repulsion's energy falls fast
    rows, survival = stability_table(random_models(), out_dir=tmp_path / "md", **kwargs)
    wild, xtb = rows
    assert xtb["model"] == REFERENCE_NAME and xtb["n_trajectories"] == 4 and xtb["stable_fraction"] == 1.0
    assert wild["stable_fraction"] == 0.0 and wild["p_logrank_vs_xtb"] < 0.05
    assert next(s for s in survival if s["model"] == "wild" and s["temperature"] == "300K")[
        "difference_vs_xtb"] == -1.0
    runs = list(csv.DictReader((tmp_path / "md" / "stability_runs.csv").open()))
    assert {(r["model"], r["steps"]) for r in runs} == {("wild", "40"), (REFERENCE_NAME, "40")}
    by_molecule = list(csv.DictReader((tmp_path / "md" / "survival_by_molecule.csv").open()))
    wild_row = next(r for r in by_molecule if r["model"] == "wild")
    assert wild_row["molecule"] == "CH3OH" and float(wild_row["p_logrank_vs_xtb"]) < 0.05
    assert wild_row["failure_modes"] != "none" and 0 <= float(wild_row["hr_error"]) <= 2
    # each failure's geometry: the failing frame, its bond off by more than 0.5 Å
    saved = sorted((tmp_path / "md" / "failures" / "wild").glob("CH3OH-300K-*.extxyz"))
    assert len(saved) == 4
    start = molecule("CH3OH")
    for path in saved:
        failed = read(path)
        assert failed.info["model"] == "wild"
        assert failed.info["reason"] in ("bond_break", "bond_deviation")
        assert failed.info["failure_mode"] == "stretch"
        bond = failed.info["failure_bonds"].split(";")[0].split(":")[0]  # e.g. "C0-H3"
        a, b = (int(re.sub(r"\D", "", atom)) for atom in bond.split("-"))
        assert failed.get_distance(a, b) - start.get_distance(a, b) > 0.5
    # cached: xTB does not run again for the same test, and runs again for another criterion
    monkeypatch.setattr(md_reference, "langevin_run", lambda *a, **k: pytest.fail("xTB ran again"))
    again, _ = stability_table(random_models(), **kwargs)
    assert again[1]["stable_fraction"] == 1.0
    with pytest.raises(pytest.fail.Exception, match="xTB ran again"):
        stability_table({}, **{**kwargs, "criteria": FU_CRITERIA})


def test_the_reference_fails_under_a_criterion_it_cannot_meet(tmp_path):
    """The reference takes the models' criteria: thermal X-H vibrations at 300 K exceed 0.02 Å."""
    tight = StabilityCriteria(max_bond_deviation=0.02)
    rows, _ = stability_table({}, default_molecules(["CH3OH"]), [300.0], engine="batched", steps=40,
                              reference_replicas=2, reference_cache=tmp_path, criteria=tight)
    assert rows[0]["model"] == REFERENCE_NAME and rows[0]["stable_fraction"] == 0.0
    assert rows[0]["failures"] == "bond_deviation:2"


def test_ekd_md_runs_both_engines_on_the_default_criteria(tmp_path):
    """ekd-md judges with FU_CRITERIA (the pipeline's and the benchmark's) on either engine."""
    import json

    torch.manual_seed(0)
    module = PotentialModule({"_target_": ANI, "hidden": {e: [8] for e in ELEMENTS}}, ELEMENTS, SAE, 0.003)
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, checkpoint)
    for engine in ("ase", "batched"):
        out = tmp_path / engine
        args = ["--checkpoints", f"m={checkpoint}", "--molecules", "CH3OH", "--temperatures", "300",
                "--engine", engine, "--replicas", "2", "--steps", "8", "--nve-steps", "0",
                "--device", "cpu", "--out", str(out)]
        assert md_main(args) == 0
        saved = json.loads((out / "stability.json").read_text())
        assert saved["criteria"]["max_bond_deviation"] == 0.5 and saved["settings"]["engine"] == engine
        assert len(saved["trajectories"]) == 2


def test_xtb_stretch_barriers_are_their_own_reference():
    from ase.calculators.emt import EMT

    rows = md_reference.stretch_barriers({"emt": EMT()}, default_molecules(["CH3OH"]), max_stretch=0.6,
                                         step=0.2)
    emt, xtb = rows
    assert (emt["model"], xtb["model"], emt["n_bonds"]) == ("emt", REFERENCE_NAME, 4)
    assert xtb["barrier_error_kcal_mol"] == 0.0 and xtb["curve_rmse_kcal_mol"] == 0.0
    assert emt["barrier_reference_kcal_mol"] == xtb["barrier_kcal_mol"] > 10.0  # 0.6 Å: > 10 kcal/mol
    assert emt["barrier_error_kcal_mol"] == pytest.approx(emt["barrier_kcal_mol"] - xtb["barrier_kcal_mol"])
    assert math.isfinite(emt["curve_rmse_kcal_mol"]) and emt["curve_rmse_kcal_mol"] > 0


def test_the_best_recipe_composes_as_its_override_form():
    """experiment=ekd_best is experiment=ekd +ablation=equivariant_teachers: four ANI and four
    ViSNet teachers, an ani2x student, the converged stopping rule."""
    from omegaconf import OmegaConf

    from ekd_lightning.workflow.compose import compose_train

    best = compose_train(["experiment=ekd_best"])
    override = compose_train(["experiment=ekd", "+ablation=equivariant_teachers"])
    assert OmegaConf.to_container(best) == OmegaConf.to_container(override)
    assert list(best.pipeline.teachers.models) == ["ani2x"] * 3 + ["ani1x"] + ["visnet_small"] * 4
    assert best.pipeline.max_epochs == 200 and best.model._target_.endswith("ANIModel")


def test_ekd_md_and_the_benchmark_run_batched_md_on_the_device(device, tmp_path, monkeypatch):
    """``--device`` reaches the batched runs of ekd-md and bench_md_stability.py (CUDA case: on
    the GPU, where the state, generator and members then live)."""
    import importlib.util
    from pathlib import Path

    from ekd_lightning.analysis import batched_md

    torch.manual_seed(0)
    module = PotentialModule({"_target_": ANI, "hidden": {e: [8] for e in ELEMENTS}}, ELEMENTS, SAE, 0.003)
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, checkpoint)
    devices, run_replicas = [], batched_md.run_replicas

    def recording(*args, **kwargs):
        devices.append(kwargs.get("device"))  # as given: None would mean the model's own
        return run_replicas(*args, **kwargs)

    monkeypatch.setattr(batched_md, "run_replicas", recording)
    common = ["--checkpoints", f"m={checkpoint}", "--molecules", "CH3OH", "--temperatures", "300",
              "--replicas", "2", "--steps", "8", "--nve-steps", "0", "--device", device]
    assert md_main([*common, "--engine", "batched", "--out", str(tmp_path / "ekd-md")]) == 0
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_md_stability.py"
    spec = importlib.util.spec_from_file_location("bench_md_stability", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([*common, "--reference-steps", "0", "--out", str(tmp_path / "bench")]) == 0
    assert devices == [device, device]
    assert (tmp_path / "bench" / "survival.csv").is_file()
