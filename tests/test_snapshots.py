"""Snapshot-ensemble teachers (Huang et al., ICLR 2017): cyclic cosine LR with warm restarts
(``optim.lr_cycle_epochs``), one checkpoint per cycle, and every snapshot an ensemble member."""

import csv
from pathlib import Path

import pytest
import torch

from conftest import train_tiny
from ekd_lightning.workflow.compose import compose_train
from ekd_lightning.workflow.pipeline import (
    Run,
    RunSpec,
    member_checkpoints,
    named_models,
    teacher_specs,
)

TINY_ANI = "model.hidden={H:[16,16],C:[16,16],N:[16,16],O:[16,16]}"
CYCLE, CYCLES = 2, 3


@pytest.fixture(scope="module")
def snapshot_run(ani1x_file, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("snapshots")
    train_tiny(ani1x_file, run_dir, "stage=teacher", TINY_ANI, "callbacks=lr_monitor",
               f"+optim.lr_cycle_epochs={CYCLE}", f"trainer.max_epochs={CYCLE * CYCLES}")
    return run_dir


def test_lr_restarts_every_cycle_and_each_cycle_end_is_a_snapshot(snapshot_run):
    rows = list(csv.DictReader(open(next(snapshot_run.glob("*/version_*/metrics.csv")))))
    lrs = [float(r["lr-AdamW"]) for r in rows if r.get("lr-AdamW")]
    assert lrs[0::CYCLE] == pytest.approx([1e-3] * CYCLES)  # each cycle starts at optim.lr
    assert all(lr < 0.6e-3 for lr in lrs[1::CYCLE])  # and anneals (cosine: 5e-4 half way)
    snapshots = sorted((snapshot_run / "checkpoints").glob("snapshot-*.ckpt"))
    assert [p.name for p in snapshots] == ["snapshot-001.ckpt", "snapshot-003.ckpt", "snapshot-005.ckpt"]
    weights = [torch.load(p, weights_only=True)["state_dict"] for p in snapshots]
    key = next(k for k in weights[0] if k.endswith("weight"))
    assert not torch.equal(weights[0][key], weights[1][key])


def test_every_snapshot_is_a_member_of_the_teacher_ensemble(snapshot_run):
    spec = RunSpec("teacher", "teacher", "ani2x", 100, CYCLE * CYCLES, (), 0)
    run = Run(spec, snapshot_run, snapshot_run / "checkpoints" / "best.ckpt", {})
    snapshots = sorted((snapshot_run / "checkpoints").glob("snapshot-*.ckpt"))
    assert run.members == snapshots
    assert member_checkpoints([run, run]) == [str(p) for p in snapshots] * 2
    models = named_models([run], {})
    assert list(models) == ["teacher0.0", "teacher0.1", "teacher0", "ensemble"]
    assert len(models["ensemble"]) == CYCLES
    plain = Run(spec, snapshot_run.parent / "none", Path("best.ckpt"), {})
    assert plain.members == [Path("best.ckpt")]  # a run without snapshots: its best checkpoint


def test_snapshot_ablation_gives_each_teacher_cycles_without_early_stopping():
    cfg = compose_train(["experiment=ekd", "+ablation=snapshot_teachers"])
    specs = teacher_specs(cfg.pipeline.teachers)
    teachers = cfg.pipeline.teachers
    assert len(specs) == len(teachers.models) == 4
    for spec in specs:
        assert spec.max_epochs == teachers.snapshots * teachers.cycle_epochs
        assert "callbacks=none" in spec.variant
        assert f"+optim.lr_cycle_epochs={teachers.cycle_epochs}" in spec.variant
    plain = teacher_specs(compose_train(["experiment=ekd"]).pipeline.teachers)
    assert all(spec.variant == () for spec in plain)
