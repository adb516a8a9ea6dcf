"""Evaluation: metrics on hand-made predictions, ensembles, checkpoints on COMP6 files, the CLI."""

import csv
import dataclasses
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from conftest import ANI, SCHNET, SHARED_S66X8, train_tiny, write_label_file
from ekd_lightning.analysis.evaluate import (
    ROW_COLUMNS,
    Prediction,
    compute_metrics,
    conformer_pair_differences,
    error_stats,
    evaluate_models,
    force_energy_consistency,
    label_quality,
    main,
    mean_prediction,
    metrics_by_subset,
    parse_named,
    predict,
)
from ekd_lightning.core.errors import DataError
from ekd_lightning.core.units import HARTREE_TO_KCALMOL as KCAL
from ekd_lightning.data import read_molecules
from ekd_lightning.task.checkpoint import load_potential
from ekd_lightning.task.module import PotentialModule
from ekd_lightning.train.training import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
ELEMENTS = ["H", "C", "N", "O"]
SAE = [-0.6, -38.1, -54.7, -75.2]


# --------------------------------------------------------------------------- pure metrics
def test_error_stats_and_pairs_by_hand():
    mae, rmse = error_stats([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert mae == pytest.approx(2.0) and rmse == pytest.approx(math.sqrt(14 / 3))
    assert all(math.isnan(v) for v in error_stats([], []))
    np.testing.assert_allclose(conformer_pair_differences([0.0, 1.0, 3.0]), [-1.0, -3.0, -2.0])
    assert conformer_pair_differences([4.0]).shape == (0,)
    assert conformer_pair_differences(np.arange(5.0)).shape == (10,)  # all pairs i < j


def hand_made():
    """Two molecules; values chosen in kcal/mol(/Å), stored in Hartree(/Å) as the data are."""
    ref_e = [np.array([0.0, 1.0, 3.0]) / KCAL, np.array([5.0]) / KCAL]
    pred_e = [np.array([1.0, 1.0, 1.0]) / KCAL, np.array([5.5]) / KCAL]
    ref_f = [np.zeros((3, 1, 3)), np.zeros((1, 2, 3))]
    pred_f = [np.full((3, 1, 3), 0.5 / KCAL), np.zeros((1, 2, 3))]
    pred_f[1][0, 0, 0] = 3.0 / KCAL
    return pred_e, ref_e, pred_f, ref_f


def test_compute_metrics_by_hand():
    metrics = compute_metrics(*hand_made())
    # energy errors 1, 0, -2 (molecule A) and 0.5 (B)
    assert metrics["energy_mae"] == pytest.approx(3.5 / 4)
    assert metrics["energy_rmse"] == pytest.approx(math.sqrt(5.25 / 4))
    # ΔE pairs of A: reference (-1, -3, -2), predicted (0, 0, 0); B has a single conformation
    assert metrics["n_pairs"] == 3
    assert metrics["de_mae"] == pytest.approx(2.0)
    assert metrics["de_rmse"] == pytest.approx(math.sqrt(14 / 3))
    # 9 components off by 0.5 and one of 15 off by 3
    assert metrics["force_mae"] == pytest.approx(7.5 / 15)
    assert metrics["force_rmse"] == pytest.approx(math.sqrt(11.25 / 15))
    assert (metrics["n_molecules"], metrics["n_conformations"]) == (2, 4)
    no_forces = compute_metrics(*hand_made()[:2])
    assert math.isnan(no_forces["force_mae"]) and no_forces["energy_mae"] == metrics["energy_mae"]


def test_compute_metrics_refuses_misaligned_input():
    pred_e, ref_e, _, _ = hand_made()
    with pytest.raises(ValueError, match="energy shapes differ"):
        compute_metrics([pred_e[0][:2], pred_e[1]], ref_e)
    with pytest.raises(ValueError, match="molecules"):
        compute_metrics(pred_e[:1], ref_e)


def test_metrics_grouped_by_subset():
    pred_e, ref_e, pred_f, ref_f = hand_made()
    extra_pred, extra_ref = np.array([2.0, 0.0]) / KCAL, np.array([0.0, 0.0]) / KCAL
    out = metrics_by_subset(
        ["gdb", "md", ""], [*pred_e, extra_pred], [*ref_e, extra_ref],
        [*pred_f, np.zeros((2, 1, 3))], [*ref_f, np.zeros((2, 1, 3))],
    )
    assert list(out) == ["all", "gdb", "md"]  # the subset-less molecule counts in "all" only
    assert out["gdb"]["energy_mae"] == pytest.approx(1.0)  # errors 1, 0, -2
    assert out["gdb"]["de_mae"] == pytest.approx(2.0)
    assert out["md"]["energy_mae"] == pytest.approx(0.5) and out["md"]["n_pairs"] == 0
    assert math.isnan(out["md"]["de_mae"])
    assert out["all"]["n_conformations"] == 6 and out["all"]["n_pairs"] == 4
    assert out["all"]["energy_mae"] == pytest.approx((3.5 + 2.0) / 6)
    # pair errors: A (1, 3, 2), extra molecule ΔE ref 0, pred 2
    assert out["all"]["de_mae"] == pytest.approx(8.0 / 4)
    assert out["all"]["force_mae"] == pytest.approx(7.5 / 21)


def test_force_energy_consistency(comp6_file):
    records, _ = read_molecules(comp6_file, "energies", "forces")
    assert force_energy_consistency(records) == pytest.approx(1.0, abs=0.1)  # EMT: F = -dE/dx
    for r in records:
        r.forces = -r.forces
    assert force_energy_consistency(records) == pytest.approx(-1.0, abs=0.1)  # gradients
    records, _ = read_molecules(comp6_file, "energies")
    assert math.isnan(force_energy_consistency(records))


@pytest.mark.skipif(not SHARED_S66X8.is_file(), reason="real COMP6 S66x8 file not present")
def test_force_energy_consistency_of_real_s66x8():
    """COMP6 v1 stores gradients under 'forces'; read as forces (negated by default) they are
    -dE/dx: slope +1, never -1."""
    records, _ = read_molecules(SHARED_S66X8, "energies", "forces")
    assert force_energy_consistency(records) == pytest.approx(1.0, abs=0.1)


def test_ensemble_is_the_member_mean():
    a = Prediction([np.array([1.0, 2.0])], [np.ones((2, 1, 3))])
    b = Prediction([np.array([3.0, 6.0])], [np.full((2, 1, 3), 3.0)])
    mean = mean_prediction([a, b])
    np.testing.assert_allclose(mean.energies[0], [2.0, 4.0])
    np.testing.assert_allclose(mean.forces[0], np.full((2, 1, 3), 2.0))


def random_modules():
    torch.manual_seed(0)
    ani = PotentialModule({"_target_": ANI, "hidden": {e: [16] for e in ELEMENTS}}, ELEMENTS, SAE, 0.01)
    schnet = PotentialModule({"_target_": SCHNET, "hidden_channels": 16, "num_filters": 16,
                                        "num_interactions": 1, "num_gaussians": 8},
                             ELEMENTS, SAE, 0.01)
    return ani.eval(), schnet.eval()


def test_predict_heterogeneous_ensemble(comp6_file):
    records, _ = read_molecules(comp6_file, "energies", "forces")
    ani, schnet = random_modules()
    one, two = predict(ani, records, batch_size=4), predict(schnet, records, batch_size=7)
    both = predict([ani, schnet], records, batch_size=64)
    for k, r in enumerate(records):
        assert one.energies[k].shape == (r.num_conformations,)
        assert one.forces[k].shape == r.forces.shape
        np.testing.assert_allclose(both.energies[k], (one.energies[k] + two.energies[k]) / 2,
                                   rtol=0, atol=1e-7)  # batch size changes float32 sums
        np.testing.assert_allclose(both.forces[k], (one.forces[k] + two.forces[k]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        predict([], records)


# --------------------------------------------------------------------------- trained checkpoints
@pytest.fixture(scope="module")
def checkpoint(ani1x_file, tmp_path_factory) -> Path:
    """A SchNet trained for 2 epochs on the EMT fixture (seconds)."""
    return train_tiny(ani1x_file, tmp_path_factory.mktemp("eval_run"), "trainer.log_every_n_steps=1",
                      "model=schnet", "model.num_interactions=1",
                      "model.hidden_channels=16", "model.num_filters=16",
                      "model.num_gaussians=16", "stage=teacher")


def check_outputs(rows, out_dir: Path, models: list[str], subsets: list[str]):
    assert [(r["model"], r["subset"]) for r in rows] == [(m, s) for m in models for s in subsets]
    for row in rows:
        assert set(ROW_COLUMNS) <= set(row)
        assert all(math.isfinite(row[c]) for c in ROW_COLUMNS[2:]), row
    table = list(csv.DictReader(open(out_dir / "metrics.csv")))
    assert [r["subset"] for r in table] == [r["subset"] for r in rows]
    assert float(table[0]["energy_mae"]) == pytest.approx(rows[0]["energy_mae"])
    saved = json.loads((out_dir / "metrics.json").read_text())  # strict JSON
    assert saved["units"]["force"] == "kcal/mol/Å" and len(saved["rows"]) == len(rows)
    assert saved["force_energy_consistency"] == pytest.approx(1.0, abs=0.1)  # F = -dE/dx
    for name in ("energy_parity.png", "force_errors.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_checkpoint_on_comp6_fixture(checkpoint, comp6_file, tmp_path):
    trained = load_potential(checkpoint)
    ani, _ = random_modules()
    rows = evaluate_models({"trained": trained, "random": ani, "ensemble": [trained, ani]},
                           comp6_file, out_dir=tmp_path)
    check_outputs(rows, tmp_path, ["trained", "random", "ensemble"], ["all", "gdb", "md"])
    counts = {r["subset"]: r["n_conformations"] for r in rows if r["model"] == "trained"}
    assert counts == {"all": 15, "gdb": 10, "md": 5}
    by = {(r["model"], r["subset"]): r for r in rows}
    assert by["trained", "all"]["energy_mae"] < by["random", "all"]["energy_mae"]
    # the predicted forces are -dE/dx of the predicted energies (a flipped sign gives -1)
    records, _ = read_molecules(comp6_file, "energies", "forces")
    for model in (trained, ani):
        pred = predict(model, records)
        as_records = [dataclasses.replace(r, energies=e, forces=f)
                      for r, e, f in zip(records, pred.energies, pred.forces, strict=True)]
        assert force_energy_consistency(as_records) == pytest.approx(1.0, abs=0.1)


@pytest.mark.skipif(not SHARED_S66X8.is_file(), reason="real COMP6 S66x8 file not present")
def test_evaluate_checkpoint_on_real_s66x8(checkpoint, tmp_path):
    rows = evaluate_models({"trained": load_potential(checkpoint)}, SHARED_S66X8, out_dir=tmp_path)
    check_outputs(rows, tmp_path, ["trained"], ["all", "s66x8"])
    assert rows[1]["n_molecules"] == 66 and rows[1]["n_conformations"] == 528
    assert rows[1]["n_pairs"] == 66 * 28


def test_cli_prints_table_and_writes_files(checkpoint, comp6_file, tmp_path, capsys):
    labels = write_label_file(tmp_path / "labels.h5", comp6_file, "energies", "forces")
    run_name = checkpoint.parent.parent.name  # an unnamed best.ckpt is named after its run
    code = main(["--checkpoints", f"t0={checkpoint}", str(checkpoint), "--ensemble", f"ens=t0,{run_name}",
                 "--data", str(comp6_file), "--labels", str(labels), "--out", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| model | subset |" in printed and "| ens | md |" in printed and "label quality" in printed
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert [r["model"] for r in rows][::3] == ["t0", run_name, "ens"]
    assert (tmp_path / "out" / "label_quality.json").is_file()
    assert main(["--checkpoints", str(tmp_path / "missing.ckpt"), "--data", str(comp6_file)]) == 2


def test_parse_named():
    named = parse_named(["a=x.ckpt", "runs/r1/checkpoints/best.ckpt", "y/model.ckpt", "model.ckpt"])
    assert named == {"a": "x.ckpt", "r1": "runs/r1/checkpoints/best.ckpt", "model": "y/model.ckpt",
                     "model_2": "model.ckpt"}


# --------------------------------------------------------------------------- label quality
def test_label_quality(comp6_file, tmp_path):
    exact = write_label_file(tmp_path / "exact.h5", comp6_file, "energies", "forces")
    quality = label_quality(exact, comp6_file, "energies", "forces")
    assert quality["force_mae"] == pytest.approx(0.0, abs=1e-9)
    assert quality["n_conformations"] == 15 and set(quality["by_subset"]) == {"gdb", "md"}

    noisy = write_label_file(tmp_path / "noisy.h5", comp6_file, "energies", "forces", noise=0.01)
    with h5py.File(noisy, "r+") as f:  # one conformation unlabelled
        forces = f["md/mol00/forces"][()]
        forces[2] = np.nan
        f["md/mol00/forces"][...] = forces
    diffs = []
    with h5py.File(noisy, "r") as f, h5py.File(comp6_file, "r") as d:
        for key in ("gdb/mol00", "gdb/mol01", "md/mol00"):
            diff = f[key]["forces"][()].astype(np.float64) - d[key]["forces"][()].astype(np.float64)
            diffs.append(diff[np.isfinite(diff).all(axis=(1, 2))].ravel() * KCAL)
    diffs = np.concatenate(diffs)
    quality = label_quality(noisy, comp6_file, "energies", "forces")
    assert quality["n_unlabelled"] == 1 and quality["n_conformations"] == 14
    assert quality["force_mae"] == pytest.approx(np.abs(diffs).mean(), rel=1e-9)
    assert quality["force_rmse"] == pytest.approx(np.sqrt((diffs**2).mean()), rel=1e-9)
    assert quality["label_std_rms"] == pytest.approx(0.01 * KCAL, rel=1e-5)
    assert quality["by_subset"]["md"]["n_unlabelled"] == 1

    with pytest.raises(DataError, match="not an ekd label file"):
        label_quality(comp6_file, comp6_file, "energies", "forces")


# --------------------------------------------------------------------------- all of COMP6
def _independent_s66x8_metrics(model) -> dict:
    """Metrics of ``model`` on the real S66x8 file computed here: numpy on the raw arrays (only
    species, coordinates, energies and forces, shapes checked; forces are stored as dE/dx) and
    the model's forward pass on hand-built batches, one molecule at a time."""
    from torch_geometric.data import Batch

    numbers_of = {b"H": 1, b"C": 6, b"N": 7, b"O": 8}
    e_err, de_err, f_err, counts, residual = [], [], [], [], []
    with h5py.File(SHARED_S66X8, "r") as f:
        for name in sorted(f["s66x8"]):
            g = f["s66x8"][name]
            z = np.array([numbers_of[s] for s in g["species"][()]])
            xyz, energy, grad = g["coordinates"][()], g["energies"][()], g["forces"][()]
            n_conf, n_atoms = len(energy), len(z)
            assert xyz.shape == grad.shape == (n_conf, n_atoms, 3) and energy.shape == (n_conf,)
            batch = Batch(z=torch.from_numpy(np.tile(z, n_conf)),
                          pos=torch.from_numpy(xyz.reshape(-1, 3).astype(np.float32)),
                          batch=torch.arange(n_conf).repeat_interleave(n_atoms))
            batch._num_graphs = n_conf
            e_pred, f_pred = model(batch)
            e_pred = e_pred.detach().double().numpy()
            f_pred = f_pred.detach().double().numpy().reshape(n_conf, n_atoms, 3)
            e_err.append(e_pred - energy)
            i, j = np.triu_indices(n_conf, k=1)
            de_err.append((e_pred[i] - e_pred[j]) - (energy[i] - energy[j]))
            f_err.append((f_pred - (-grad)).ravel())
            counts += [[np.sum(z == k) for k in (1, 6, 7, 8)]] * n_conf
            residual.append(energy - e_pred)
    counts, residual = np.array(counts, float), np.concatenate(residual)
    offsets = np.linalg.lstsq(counts, residual, rcond=None)[0]
    shifted = np.concatenate(e_err) + counts @ offsets
    out = {}
    for key, err in (("energy", np.concatenate(e_err)), ("de", np.concatenate(de_err)),
                     ("force", np.concatenate(f_err)), ("energy_shifted", shifted)):
        out[f"{key}_mae"] = np.abs(err).mean() * KCAL
        out[f"{key}_rmse"] = np.sqrt((err**2).mean()) * KCAL
    return out


@pytest.mark.skipif(not SHARED_S66X8.is_file(), reason="real COMP6 S66x8 file not present")
def test_comp6_folder_command_on_real_s66x8(checkpoint, tmp_path, capsys):
    """``python -m ekd_lightning.evaluate --data <comp6v1 folder>`` on the real S66x8 file gives
    the numbers computed independently from the raw HDF5 arrays and the model's predictions."""
    folder = tmp_path / "comp6v1"
    folder.mkdir()
    (folder / SHARED_S66X8.name).symlink_to(SHARED_S66X8)
    assert main(["--checkpoints", f"m={checkpoint}", "--data", str(folder), "--no-plots",
                 "--out", str(tmp_path / "out")]) == 0
    assert "energy_shifted_mae" in capsys.readouterr().out
    rows = {r["subset"]: r for r in json.loads((tmp_path / "out" / "metrics.json").read_text())["rows"]}
    assert set(rows) == {"all", "s66x8"} and rows["all"]["n_conformations"] == 528
    expected = _independent_s66x8_metrics(load_potential(checkpoint).eval())
    for subset in ("all", "s66x8"):
        for key, value in expected.items():
            assert rows[subset][key] == pytest.approx(value, rel=1e-5), (subset, key)
    assert expected["energy_shifted_mae"] < expected["energy_mae"]


def test_several_files_pool_into_one_benchmark(checkpoint, comp6_file, tmp_path):
    """Two COMP6-layout files (one given as a folder) give one table: a row per subset of
    both and an ``all`` row over every conformation, equal to evaluating the files' molecules
    together; the shift columns use offsets fitted on everything."""
    import ekd_lightning.analysis.evaluate as ev
    from conftest import write_comp6_file

    other = tmp_path / "more"
    other.mkdir()
    with h5py.File(write_comp6_file(other / "x.h5", seed=5), "r+") as f:
        f.move("gdb", "extra")  # another subset name, so keys differ from comp6_file's
        f.move("md", "extra2")
    model = load_potential(checkpoint)
    rows = evaluate_models({"m": model}, [comp6_file, other], plots=False)
    by = {r["subset"]: r for r in rows}
    assert set(by) == {"all", "gdb", "md", "extra", "extra2"}
    assert by["all"]["n_conformations"] == 30
    records = read_molecules(comp6_file, "energies", "forces")[0] + read_molecules(
        other / "x.h5", "energies", "forces")[0]
    direct = ev.metric_rows("m", predict(model, records), records)
    for key in (*ev.METRIC_COLUMNS, *ev.SHIFTED_COLUMNS):
        assert by["all"][key] == pytest.approx(direct[0][key]), key
    with pytest.raises(DataError, match="more than one file"):
        evaluate_models({"m": model}, [comp6_file, comp6_file], plots=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .h5 file"):
        evaluate_models({"m": model}, tmp_path / "empty", plots=False)


def test_pipeline_test_data_takes_a_folder_list_and_the_force_convention(
        checkpoint, ani1x_file, comp6_file, tmp_path):
    """pipeline.test_data.path may be a list (file, folder) and forces_are_gradients reaches
    the reader: forcing 'gradients' on a file of true forces negates its reference forces."""
    from ekd_lightning import pipeline

    folder = tmp_path / "comp6v1"
    folder.mkdir()
    (folder / "b.h5").symlink_to(comp6_file)
    register_resolvers()
    with initialize_config_module(config_module="ekd_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=ekd", f"data.path={ani1x_file}", "data.energy_key=emt.energy",
            "data.force_key=null", f"pipeline.test_data.path=[{folder}]",
            "pipeline.test_data.forces_are_gradients=true"])
    model = load_potential(checkpoint)
    results = pipeline.evaluate(cfg, {"m": model}, tmp_path / "labels.h5", tmp_path / "out")
    test = {r["subset"]: r for r in results["test"]}
    assert set(test) == {"all", "gdb", "md"}
    flipped = evaluate_models({"m": model}, comp6_file, forces_are_gradients=True, plots=False)[0]
    assert test["all"]["force_mae"] == pytest.approx(flipped["force_mae"])
    # work along the conformations against ΔE: slope -1 once true forces are negated
    about = json.loads((tmp_path / "out" / "test" / "metrics.json").read_text())
    assert about["force_energy_consistency"] < -0.5
