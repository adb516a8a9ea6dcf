"""W&B runs a user can tell apart: sweep jobs and pipeline runs get distinct names, a shared
group, their stage as job type and their overrides as tags (read back from offline run files)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_label_file
from ekd_lightning.workflow.compose import compose_train
from ekd_lightning.workflow.pipeline import RunSpec, make_jobs

ROOT = Path(__file__).resolve().parents[1]


def offline_run_record(run_dir: Path):
    """The run record (display name, group, job type, tags) of the one offline W&B run under
    ``run_dir/wandb``, read from its ``.wandb`` file: wandb's LevelDB-style log (a 7-byte
    header, 32 KiB blocks of chunks with a 7-byte header: CRC, length, type full/first/middle/
    last) of ``Record`` protobufs, parsed with wandb's own message class."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, payload = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + 7 <= len(data):
        if (space := 32768 - pos % 32768) < 7:  # block trailer: padding
            pos += space
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "run":
                return record.run
    raise AssertionError(f"{path} holds no run record")


@pytest.mark.slow
def test_multirun_jobs_get_distinct_names_in_one_group(ani1x_file, tmp_path):
    """``-m loss.forces.weight=0.01,0.1,1``: three W&B runs named by their swept value, in the
    group of the sweep, job type ``student``, each tagged with its overrides."""
    labels = write_label_file(tmp_path / "labels.h5", ani1x_file, "emt.energy", "emt.forces")
    command = [sys.executable, str(ROOT / "train.py"), "-m", "stage=student",
               "loss.forces.weight=0.01,0.1,1", f"data.path={ani1x_file}",
               "data.energy_key=emt.energy", "data.force_key=emt.forces",
               f"distill.labels={labels}", "logger=wandb", "logger.mode=offline",
               "trainer.max_epochs=1", "+trainer.limit_train_batches=1",
               "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
               "trainer.enable_progress_bar=false", "model=schnet", "model.num_interactions=1",
               "model.hidden_channels=8", "model.num_filters=8", "hydra.sweep.subdir=${hydra.job.num}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "multirun").glob("[0-9]"))
    records = [offline_run_record(job) for job in jobs]
    assert len(records) == 3
    names = [r.display_name for r in records]
    assert names == [f"student-schnet-seed0 loss.forces.weight={w}" for w in ("0.01", "0.1", "1")]
    assert len({r.run_group for r in records}) == 1
    assert records[0].run_group.startswith("sweep: stage=student loss.forces.weight=0.01,0.1,1")
    assert [r.job_type for r in records] == ["student"] * 3
    assert "loss.forces.weight=0.1" in records[1].tags and "stage=student" in records[1].tags


def test_pipeline_runs_named_by_their_pipeline_grouped_by_it(tmp_path):
    """The runs of two ablation variants (same stage, model and seed) get distinct W&B names,
    each in its own pipeline's group, job type the stage, the variant's overrides as tags."""
    spec = RunSpec("student", "student", "ani2x", 0, 5, variant=("++loss.forces.weight=1.0",))
    shown = {}
    for variant in ("force_weight", "warmup"):
        command = ["experiment=ekd", f"+ablation={variant}", "logger=wandb"]
        cfg = compose_train(command)
        (job,) = make_jobs(cfg, [spec], tmp_path, command)
        shown[variant] = job.cfg["logger"]
    assert shown["force_weight"]["display_name"] == "ablation-force_weight/student-seed0"
    assert shown["warmup"]["display_name"] == "ablation-warmup/student-seed0"
    assert [s["group"] for s in shown.values()] == ["ablation-force_weight", "ablation-warmup"]
    assert all(s["job_type"] == "student" for s in shown.values())
    assert "++loss.forces.weight=1.0" in shown["warmup"]["tags"]
