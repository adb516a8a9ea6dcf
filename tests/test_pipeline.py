"""The one-command EKD pipeline (python train.py experiment=ekd) on tiny EMT data."""

import csv
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ekd_lightning.core.errors import ConfigError
from ekd_lightning.train.training import config_sha256
from ekd_lightning.workflow.compose import compose_train
from ekd_lightning.workflow.pipeline import (
    RunSpec,
    ablation_row,
    ablation_table,
    gap_closed,
    main,
    run_pipeline,
    seed_summary,
    variant_jobs,
)

ROOT = Path(__file__).resolve().parents[1]


def pipeline_cfg(data_file, test_file, store, *overrides):
    """The tiny pipeline's config and the overrides it is composed with (which compose its runs)."""
    command = [
        "experiment=ekd", f"data.path={data_file}", "data.energy_key=emt.energy",
        "data.force_key=emt.forces", "data.batch_size=16", "logger=csv",
        f"pipeline.store={store}", "pipeline.teachers.models=[ani2x,schnet_small]",
        # teachers: 6 epochs at lr 3e-3 learn enough forces from energies that the student
        # beats the baseline (measured held-out 27.5 vs 40.5 kcal/mol/Å, oracle 16.6)
        "pipeline.teachers.max_epochs=6", "optim.lr=3e-3", "pipeline.max_epochs=2",
        "pipeline.seeds=[0,1]",
        f"pipeline.test_data.path={test_file}", "pipeline.md.steps=20",
        "pipeline.md.nve_steps=10", "pipeline.md.molecules=[CH3OH]", "pipeline.md.replicas=2",
        "pipeline.md.reference_steps=20",
        *overrides,
    ]
    return compose_train(command), command


@pytest.fixture(scope="module")
def finished(ani1x_file, comp6_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    cfg, command = pipeline_cfg(ani1x_file, comp6_file, root / "store", "pipeline.workers=2")
    report = run_pipeline(cfg, root / "ekd", command)
    return (cfg, command), root, report


def test_pipeline_report_compares_every_model(finished):
    _, root, report = finished
    models = {e["model"]: e for e in report["heldout"]["summary"]}
    assert {"baseline", "student", "oracle", "teacher0", "teacher1", "ensemble"} <= set(models)
    assert models["student"]["n_seeds"] == 2 and models["oracle"]["n_seeds"] == 1
    for split in ("heldout", "test"):
        entries = {e["model"]: e for e in report[split]["summary"]}
        for entry in entries.values():  # EMT forces of displaced molecules: tens of kcal/mol/Å
            assert 1 < entry["force_mae"] < 200 and 0.1 < entry["energy_mae"] < 200, entry
            assert all(math.isfinite(v) for k, v in entry.items() if k.endswith("_mae")), entry
        force = {m: entries[m]["force_mae"] for m in ("baseline", "student", "oracle")}
        assert force["oracle"] < force["student"] < 0.85 * force["baseline"], (split, force)
        assert 0.3 < report[split]["force_gap_closed"] < 1.0
    # run folders are named by each run's model file (schnet_small is the schnet class)
    folders = {p.name.rsplit("-", 1)[0] for p in (root / "store").iterdir() if p.is_dir()}
    assert {"teacher-ani2x-seed100", "teacher-schnet_small-seed101", "student-ani2x-seed1"} <= folders
    # the test file is evaluated per COMP6 subset, the labels against the true forces
    test_rows = json.loads((root / "ekd/report/test/metrics.json").read_text())["rows"]
    assert {r["subset"] for r in test_rows} == {"all", "gdb", "md"}
    assert report["labels"]["n_conformations"] == 320 and report["labels"]["force_mae"] > 0
    assert {r["model"].split("-seed")[0] for r in report["md"]} == {"baseline", "student", "oracle"}
    # the MD step's survival rows: per model and temperature (2 replicas of CH3OH each), pooled,
    # each model tested against the baseline; h(r) against the GFN2-xTB reference
    survival = list(csv.DictReader((root / "ekd/report/md/survival.csv").open()))
    assert sorted((r["model"], r["temperature"], r["n"]) for r in survival) == sorted(
        (f"{m}-seed0", t, "4" if t == "all" else "2")
        for m in ("baseline", "student", "oracle") for t in ("300K", "1000K", "all"))
    student = next(r for r in report["md"] if r["model"] == "student-seed0")
    assert student["n_trajectories"] == 4 and "p_logrank" in student
    assert student["survival_1000K"].count("[") == 1 and 0 <= student["hr_error_300K"] <= 2
    assert [r["p_logrank"] for r in survival if r["model"] == "baseline-seed0"] == ["", "", ""]
    text = (root / "ekd/report/summary.md").read_text()
    assert "gap closed" in text and "| student | 2 |" in text
    assert "| p_logrank |" in text
    for name in ("heldout/energy_parity.png", "test/force_errors.png", "md/stability.csv",
                 "md/survival.png", "heldout/force_parity.png", "learning_curves.png"):
        assert (root / "ekd/report" / name).is_file()


def test_report_compares_converged_ends_and_costs(finished):
    _, root, report = finished
    text = (root / "ekd/report/summary.md").read_text()
    best = report["best_teacher"]
    assert best in ("teacher0", "teacher1")
    for line in ("student vs baseline: force MAE", f"best single teacher ({best}",
                 "student vs teacher ensemble", "student vs oracle: force MAE",
                 "early stopping on `val/loss`", "| teacher1 | 6 | ", "| student-seed1 | 2 | ",
                 "teachers ", "ms per conformation", "the student's time per conformation",
                 "![Learning curves", "(learning_curves.png)", "(heldout/force_parity.png)"):
        assert line in text, line
    training = report["training"]
    assert set(training) == {"teacher0", "teacher1", "baseline-seed0", "baseline-seed1",
                             "student-seed0", "student-seed1", "oracle-seed0"}
    for name, t in training.items():  # teachers: pipeline.teachers.max_epochs=6, others 2
        cap = 6 if name.startswith("teacher") else 2
        assert t["epochs"] == cap and t["train_time_s"] > 0 and 1 <= t["best_epoch"] <= t["epochs"], name
    inference = report["inference_s_per_conformation"]
    assert set(inference) == {"student-seed0", "baseline-seed0", "ensemble"}
    assert all(v > 0 for v in inference.values())
    # every name in the report is a run's record; the ablation table reads roles from them
    saved = json.loads((root / "ekd/report/summary.json").read_text())
    assert saved["runs"]["student-seed1"] == {
        "role": "student", "stage": "student", "model": "ani2x", "seed": 1, "max_epochs": 2,
        "index": None}
    assert saved["runs"]["teacher1"]["model"] == "schnet_small"
    row = ablation_row("tiny", saved)
    assert {"md_stable_baseline", "md_stable_student", "md_stable_oracle"} <= set(row)


def test_student_trains_on_the_teachers_labels(finished):
    _, root, _ = finished
    labels = list((root / "store").glob("labels-*.h5"))
    assert len(labels) == 1
    students = list((root / "store").glob("student-*/run_info.json"))
    assert len(students) == 2
    for info in students:
        assert json.loads(info.read_text())["labels"] == str(labels[0])


def test_rerun_trains_nothing_again_and_replaces_the_report_atomically(finished, monkeypatch):
    """A rerun trains nothing; summary.md and summary.json reach their place by os.replace (a
    temporary file renamed), never by writing into the report a reader may be reading."""
    cfg, root, report = finished
    checkpoints = {p: p.stat().st_mtime_ns for p in (root / "store").glob("*/checkpoints/*.ckpt")}
    replaced = []
    real_replace = os.replace

    def spy(src, dst, *args, **kwargs):
        replaced.append(Path(dst).name)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", spy)
    config, command = cfg
    again = run_pipeline(config, root / "ekd", command)
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    assert again["heldout"]["summary"] == report["heldout"]["summary"]
    assert {"summary.md", "summary.json"} <= set(replaced)


def test_ablation_table_lists_each_report(finished, tmp_path):
    _, root, _ = finished
    (tmp_path / "naive").symlink_to(root / "ekd")
    table = ablation_table(tmp_path)
    assert "| naive |" in table and "gap closed" in table
    assert main(["ablation", str(tmp_path), "--out", str(tmp_path / "ablation.md")]) == 0
    assert (tmp_path / "ablation.md").read_text() == table + "\n"
    with pytest.raises(FileNotFoundError):
        ablation_table(tmp_path / "nothing")


def test_gap_closed_and_seed_summary():
    runs = [RunSpec(role, role, "ani2x", s, 2) for role in ("baseline", "student", "oracle")
            for s in (0, 2)]
    rows = [{"model": run.name, "subset": "all", "energy_mae": 1.0, "de_mae": 1.0,
             "force_mae": value + run.seed, "force_rmse": 1.0}
            for run, value in zip(runs, (10.0, 10.0, 6.0, 6.0, 2.0, 2.0), strict=True)]
    summary = seed_summary(rows, runs)
    assert [e["force_mae"] for e in summary] == [11.0, 7.0, 3.0]
    assert summary[0]["force_mae_std"] == 1.0
    assert gap_closed(summary) == pytest.approx(0.5)
    assert gap_closed(summary[:2]) != gap_closed(summary[:2])  # NaN without an oracle


def test_force_overrides_reach_student_and_oracle_only(ani1x_file, comp6_file, tmp_path):
    cfg, command = pipeline_cfg(ani1x_file, comp6_file, tmp_path,
                                "+pipeline.force_overrides.loss.forces.weight=1.0",
                                "+pipeline.student_overrides.loss.forces.weighting=inverse_variance")
    labels = tmp_path / "labels.h5"
    jobs = {stage: variant_jobs(cfg, stage, tmp_path, labels, command)
            for stage in ("student", "oracle", "baseline")}
    student, oracle, baseline = (jobs[s][0].cfg["loss"] for s in ("student", "oracle", "baseline"))
    assert student["forces"]["weight"] == oracle["forces"]["weight"] == 1.0
    assert student["forces"]["weighting"] == "inverse_variance"
    assert oracle["forces"]["weighting"] == "uniform"
    assert baseline["forces"] is None
    assert jobs["student"][0].cfg["distill"]["labels"] == str(labels)
    default, command = pipeline_cfg(ani1x_file, comp6_file, tmp_path)
    # without overrides the oracle keeps its stage file's force weight
    assert variant_jobs(default, "oracle", tmp_path, None, command)[0].cfg["loss"]["forces"]["weight"] == 0.1


def test_each_run_records_the_command_that_composes_it(finished):
    """Every run's run_info.json holds the ``ekd-train`` line that composes its config into its
    folder: composed here, each line gives the config_sha256 of the run's metrics.json; the
    student's line, run as the command, finds its run finished with that config (a different
    config would be refused: exit code 2) and trains nothing."""
    _, root, _ = finished
    infos = {p.parent: json.loads(p.read_text()) for p in (root / "store").glob("*/run_info.json")}
    assert len(infos) == 7  # 2 teachers, 2 baselines, 2 students, 1 oracle
    for run_dir, info in infos.items():
        program, *overrides, folder = shlex.split(info["command"])
        assert program == "ekd-train" and folder == f"hydra.run.dir={run_dir}", info["command"]
        assert info["cwd"] == os.getcwd()
        recorded = json.loads((run_dir / "metrics.json").read_text())["config_sha256"]
        assert config_sha256(compose_train(overrides)) == recorded, run_dir.name
    (student,) = [d for d in infos if d.name.startswith("student-ani2x-seed1-")]
    stamps = {p: p.stat().st_mtime_ns for p in student.rglob("*.ckpt")}
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [str(Path(sys.executable).parent / "ekd-train"), *shlex.split(infos[student]["command"])[1:]]
    done = subprocess.run(command, cwd=infos[student]["cwd"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{student} already finished with this config" in done.stdout + done.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_config_changed_after_composing_is_refused(ani1x_file, comp6_file, tmp_path):
    """Runs are composed from the overrides, so a pipeline config changed after composing them
    would be left out of its runs: refused, naming the key."""
    cfg, command = pipeline_cfg(ani1x_file, comp6_file, tmp_path)
    with pytest.raises(ConfigError, match=r"outside ekd-train / train.py pass overrides="):
        variant_jobs(cfg, "baseline", tmp_path)  # not under Hydra: the overrides are needed
    cfg.optim.lr = 0.5
    with pytest.raises(ConfigError, match=r"optim.lr: 0.003 -> 0.5"):
        variant_jobs(cfg, "baseline", tmp_path, None, command)
