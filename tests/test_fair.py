"""EKD measured fairly: one stopping rule (EarlyStopping from YAML), the recorded history, the
gap-closed guard and the report's figures (grid layout, one colour per role)."""

import json

import matplotlib.image
import numpy as np
import pytest
from matplotlib.colors import to_hex

from ekd_lightning.analysis.evaluate import Prediction
from ekd_lightning.analysis.plots import (
    ROLE_COLOURS,
    plot_energy_parity,
    plot_force_errors,
    plot_force_parity,
    plot_learning_curves,
)
from ekd_lightning.data import read_molecules
from ekd_lightning.train.training import run_training
from ekd_lightning.workflow.pipeline import RunSpec, gap_verdict, seed_summary
from test_training import SMALL_ANI, make_cfg

STOP = ("callbacks=early_stopping", "callbacks.early_stopping.patience=2", SMALL_ANI)


def test_stopping_rule_stops_a_stalled_run_and_records_it(ani1x_file, tmp_path):
    # lr 0: val/loss never improves after the first epoch, so patience 2 ends it at epoch 3
    cfg = make_cfg(ani1x_file, "stage=baseline", "trainer.max_epochs=20", "optim.lr=0", *STOP)
    metrics = run_training(cfg, tmp_path)
    assert metrics["epochs"] == 3 and metrics["stopped_early"] is True
    assert metrics["best_epoch"] == 1 and metrics["max_epochs"] == 20
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all({"val/loss", "val/energy_mae", "val/force_mae", "time_s"} <= set(h) for h in history)
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 3


def test_stopping_rule_lets_an_improving_run_reach_its_cap(ani1x_file, tmp_path):
    cfg = make_cfg(ani1x_file, "stage=baseline", "trainer.max_epochs=5", "optim.lr=3e-3", *STOP)
    metrics = run_training(cfg, tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    losses = [h["val/loss"] for h in history]
    assert metrics["epochs"] == 5 and metrics["stopped_early"] is False
    assert metrics["best_epoch"] == 1 + int(np.argmin(losses))
    assert metrics["train_time_s"] >= history[-1]["time_s"] > history[0]["time_s"] > 0


def summary_with(oracle: float, spread: float):
    runs = [RunSpec(role, role, "ani2x", s, 30) for role in ("baseline", "student", "oracle")
            for s in (0, 1)]
    values = {"baseline": 10.0, "student": 8.0, "oracle": oracle}
    rows = [{"model": run.name, "subset": "all", "energy_mae": 1.0, "de_mae": 1.0,
             "force_mae": values[run.role] + (2 * run.seed - 1) * spread, "force_rmse": 1.0}
            for run in runs]
    return seed_summary(rows, runs)


def test_gap_closed_needs_an_oracle_clearly_better_than_the_baseline():
    closed, why = gap_verdict(summary_with(oracle=6.0, spread=0.5))
    assert closed == pytest.approx(0.5) and why == ""
    # the oracle 0.9 below a baseline whose seeds spread ±0.5: no "229%", a reason instead
    closed, why = gap_verdict(summary_with(oracle=9.1, spread=0.5))
    assert np.isnan(closed) and why.startswith("n/a") and "0.90" in why
    closed, why = gap_verdict(summary_with(oracle=11.0, spread=0.0))  # oracle worse
    assert np.isnan(closed) and why.startswith("n/a")


NAMES = ["teacher0", "teacher1", "teacher2", "teacher3", "ensemble", "baseline-seed0",
         "baseline-seed1", "baseline-seed2", "student-seed0", "student-seed1", "student-seed2",
         "oracle-seed0"]


@pytest.fixture(scope="module")
def predictions(comp6_file):
    records, _ = read_molecules(comp6_file, "energies", "forces", "comp6", ["H", "C", "N", "O"])
    rng = np.random.default_rng(0)
    preds = {name: Prediction([r.energies + rng.normal(0, 1e-3, r.energies.shape) for r in records],
                              [r.forces + rng.normal(0, 1e-2, r.forces.shape) for r in records])
             for name in NAMES}
    return preds, records


def png_shape(path):
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


@pytest.mark.parametrize("plot", [plot_energy_parity, plot_force_parity])
def test_parity_plots_are_a_grid_of_one_panel_per_role(plot, predictions, tmp_path):
    preds, records = predictions
    fig = plot(preds, records, tmp_path / "parity.png")
    assert len(fig.axes) == 5  # teacher, ensemble, baseline, student, oracle: 12 models pooled
    titles = [ax.get_title().split(" (")[0] for ax in fig.axes]
    assert titles == ["teacher", "ensemble", "baseline", "student", "oracle"]
    width, height = png_shape(tmp_path / "parity.png")
    assert 1.0 <= width / height <= 2.0 and width <= 1600  # 3 columns x 2 rows, not 1 x 12


def test_force_errors_draw_one_line_per_role_in_its_colour(predictions, tmp_path):
    preds, records = predictions
    fig = plot_force_errors(preds, records, tmp_path / "errors.png")
    (ax,) = fig.axes
    colours = [to_hex(p.get_edgecolor()) for p in ax.patches]
    assert colours == [ROLE_COLOURS[r] for r in ("teacher", "ensemble", "baseline", "student", "oracle")]
    assert len(set(colours)) == 5


def test_learning_curves_colour_each_run_by_its_role(tmp_path):
    histories = {name: [{"epoch": e, "val/force_mae": 10.0 / e, "val/energy_mae": 5.0 / e}
                        for e in range(1, 4)] for name in NAMES if name != "ensemble"}
    fig = plot_learning_curves(histories, tmp_path / "curves.png")
    assert len(fig.axes) == 2
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == len(histories)
        by_role = {}
        for line, name in zip(lines, histories, strict=True):
            by_role.setdefault(name.split("-seed")[0].rstrip("0123"), set()).add(to_hex(line.get_color()))
        assert by_role == {"teacher": {ROLE_COLOURS["teacher"]}, "baseline": {ROLE_COLOURS["baseline"]},
                           "student": {ROLE_COLOURS["student"]}, "oracle": {ROLE_COLOURS["oracle"]}}
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["teacher", "baseline",
                                                                       "student", "oracle"]
    width, height = png_shape(tmp_path / "curves.png")
    assert width > height


def test_figures_take_roles_from_the_run_records(predictions, tmp_path):
    """The pipeline gives each model's role (its run record), whatever the name says."""
    preds, records = predictions
    named = {"first run": preds["teacher0"], "second run": preds["student-seed0"]}
    fig = plot_force_errors(named, records, tmp_path / "errors.png",
                            roles={"first run": "teacher", "second run": "student"})
    assert [to_hex(p.get_edgecolor()) for p in fig.axes[0].patches] == [
        ROLE_COLOURS["teacher"], ROLE_COLOURS["student"]]


def test_report_calls_a_comparison_with_capped_runs_budget_matched():
    """The gap line says "converged" only when early stopping ended every run; a run that
    reached the epoch cap makes it "budget-matched", naming the run (mutation: reading
    stopped_early=True as capped calls a converged comparison budget-matched, and vice versa)."""
    from ekd_lightning.workflow.pipeline import convergence_note

    done = {"epochs": 74, "stopped_early": True, "max_epochs": 200}
    assert convergence_note({"baseline-seed0": done, "student-seed0": done}).startswith("converged")
    capped = {"epochs": 40, "stopped_early": False, "max_epochs": 40}
    note = convergence_note({"baseline-seed0": {**done, "max_epochs": 40}, "oracle-seed0": capped})
    assert note.startswith("budget-matched") and "1 of 2" in note and "oracle-seed0" in note
    assert "cap of 40 epochs" in note


def test_a_converged_baseline_beside_capped_runs_is_not_called_budget_matched():
    """``pipeline.baseline_max_epochs`` caps the baselines alone (the quick start's converged
    reference): the students and the oracle keep ``pipeline.max_epochs``, and the report names
    the comparison "not converged" with the runs the rule ended, never "budget-matched"
    (mutation: applying the baseline cap to every role, or keeping the old note)."""
    from ekd_lightning.workflow.compose import compose_train
    from ekd_lightning.workflow.pipeline import convergence_note, variant_specs

    cfg = compose_train(["experiment=ekd", "pipeline.max_epochs=30", "pipeline.baseline_max_epochs=200"])
    caps = {role: {s.max_epochs for s in variant_specs(cfg, role, "labels.h5")}
            for role in ("baseline", "student", "oracle")}
    assert caps == {"baseline": {200}, "student": {30}, "oracle": {30}}
    plain = compose_train(["experiment=ekd", "pipeline.max_epochs=30"])
    assert {s.max_epochs for s in variant_specs(plain, "baseline")} == {30}

    note = convergence_note({"baseline-seed0": {"epochs": 143, "stopped_early": True, "max_epochs": 200},
                             "student-seed0": {"epochs": 30, "stopped_early": False, "max_epochs": 30}})
    assert note.startswith("not converged") and "student-seed0" in note
    assert note.endswith("ended by the rule: baseline-seed0")


def test_the_report_flags_a_capped_student_against_a_converged_baseline_from_the_records():
    """The report's "budget-limited student against a converged baseline" sentence follows the
    runs' own records (every student at its cap, every baseline ended by the rule), and its
    rerun hint names the baselines' cap (mutation: ignoring the baselines' stopped_early flags
    the comparison when both sides were capped)."""
    from ekd_lightning.workflow.pipeline.report import capped_against_converged

    def report(student_stopped: bool, baseline_stopped: bool) -> dict:
        training = {"student-seed0": {"stopped_early": student_stopped, "max_epochs": 30},
                    "baseline-seed0": {"stopped_early": baseline_stopped, "max_epochs": 200},
                    "teacher0": {"stopped_early": False, "max_epochs": 30}}
        roles = {"student-seed0": "student", "baseline-seed0": "baseline", "teacher0": "teacher"}
        return {"training": training, "runs": {n: {"role": r} for n, r in roles.items()}}

    assert capped_against_converged(report(False, True)) == 200
    assert capped_against_converged(report(False, False)) is None
    assert capped_against_converged(report(True, True)) is None

