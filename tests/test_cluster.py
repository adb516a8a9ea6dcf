"""Beyond one machine: DDP training, two simulated nodes, a run store shared by concurrent jobs,
Hydra's submitit launcher and the pipeline's trainings as submitit jobs (all on this machine:
gloo over loopback, submitit's local executor)."""

import csv
import filecmp
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module

from conftest import write_label_file
from ekd_lightning.train.training import run_training
from test_pipeline import pipeline_cfg
from test_training import SMALL_ANI, make_cfg

ROOT = Path(__file__).resolve().parents[1]
DATA = ("data.energy_key=emt.energy", "data.force_key=emt.forces", "logger=csv",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
TEACHER = ("stage=teacher", "trainer.max_epochs=2", SMALL_ANI, "optim.lr=3e-3")
VAL_KEYS = ("val/loss", "val/energy_mae", "val/energy_rmse", "val/force_mae", "test/energy_mae",
            "test/force_mae")


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            **extra}


def _cli(script: str, run_dir: Path, *overrides: str, env=None, cwd=None) -> subprocess.Popen:
    """Start ``script`` (train.py or distill.py) with Hydra's run folder ``run_dir``."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *overrides, f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd or run_dir.parent,
        env=env or _env(),
    )


def _finish(*processes: subprocess.Popen) -> None:
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- DDP training
@pytest.fixture(scope="module")
def one_process(ani1x_file, tmp_path_factory) -> Path:
    """The teacher trained by one DDP process on global batches of 32 (the reference)."""
    run_dir = tmp_path_factory.mktemp("ddp1") / "run"
    _finish(_cli("train.py", run_dir, f"data.path={ani1x_file}", *DATA, *TEACHER, "trainer=ddp",
                 "trainer.accelerator=cpu", "trainer.devices=1", "data.batch_size=32"))
    return run_dir


@pytest.mark.slow
def test_ddp_training_equals_one_process_on_the_same_global_batch(ani1x_file, one_process, tmp_path):
    """Two gloo processes with 16 conformations each per step see the same global batches as
    one process with 32 (DistributedSampler, same seed; 256 training and 32 validation
    conformations split evenly): the energy-only loss is a mean over conformations, so the
    averaged gradients, the weights and the validation metrics agree to float32 rounding."""
    run_dir = tmp_path / "run"
    _finish(_cli("train.py", run_dir, f"data.path={ani1x_file}", *DATA, *TEACHER, "trainer=ddp",
                 "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=16"))
    ddp, ref = _metrics(run_dir), _metrics(one_process)
    for key in VAL_KEYS:
        assert ddp[key] == pytest.approx(ref[key], rel=1e-5), key
    # not identical: train/loss, the epoch mean of rank 0's own batches (logged unsynced)
    assert ddp["config_sha256"] != ref["config_sha256"]  # batch size and devices differ
    # written once, by rank 0: one logger version with one row per epoch, one pair of checkpoints
    logs = run_dir / "teacher-ani2x-seed0"  # the CSV logger's folder is named by run_name
    assert [p.name for p in logs.iterdir()] == ["version_0"]
    rows = list(csv.DictReader(open(logs / "version_0/metrics.csv")))
    assert len([r for r in rows if r.get("val/loss")]) == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


TWO_NODES = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2")


def node_env(rank: int, port: int) -> dict:
    """Node ``rank`` of 2 (one process each) on loopback, as Lightning reads it from the
    environment (LightningEnvironment: LOCAL_RANK set, so it starts no processes itself)."""
    return _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(rank),
                WORLD_SIZE="2", LOCAL_RANK="0", SOURCE_DATE_EPOCH="1700000000")


@pytest.mark.slow
def test_two_simulated_nodes_train_like_two_processes(ani1x_file, one_process, tmp_path):
    """train.py as 2 nodes x 1 process: the same metrics as the DDP runs, only node 0 writes."""
    port = _free_port()
    nodes = [tmp_path / f"node{rank}" for rank in (0, 1)]
    _finish(*[_cli("train.py", nodes[rank], f"data.path={ani1x_file}", *DATA, *TEACHER, *TWO_NODES,
                   "data.batch_size=16", env=node_env(rank, port)) for rank in (0, 1)])
    trained, ref = _metrics(nodes[0]), _metrics(one_process)
    for key in VAL_KEYS:
        assert trained[key] == pytest.approx(ref[key], rel=1e-5), key
    assert (nodes[0] / "checkpoints" / "best.ckpt").is_file()
    assert not (nodes[1] / "metrics.json").exists() and not (nodes[1] / "checkpoints").exists()


@pytest.mark.slow
def test_two_simulated_nodes_label_the_same_bytes(ani1x_file, one_process, tmp_path):
    """distill.py as 2 nodes x 1 process writes the label file of one process, byte for byte
    (SOURCE_DATE_EPOCH fixes its 'created' time)."""
    teacher = one_process / "checkpoints" / "best.ckpt"
    labels = (f"data.path={ani1x_file}", "data.energy_key=emt.energy", "data.force_key=null",
              f"teachers=[{teacher}]", "batch_size=16", "chunk_size=32",
              "trainer.enable_progress_bar=false")
    single = tmp_path / "single.h5"
    _finish(_cli("distill.py", tmp_path / "distill1", *labels, f"out={single}",
                 env=_env(SOURCE_DATE_EPOCH="1700000000"), cwd=tmp_path))
    port = _free_port()
    spread = tmp_path / "two_nodes.h5"
    _finish(*[_cli("distill.py", tmp_path / f"distill-node{rank}", *labels, f"out={spread}",
                   *TWO_NODES, env=node_env(rank, port), cwd=tmp_path) for rank in (0, 1)])
    assert filecmp.cmp(single, spread, shallow=False)


# ----------------------------------------------------------------------------- run store
class _HoldTheRun(pl.Callback):
    """Says when the first job trains, and keeps it from finishing until the second has started."""

    def __init__(self, training, started):
        self.training, self.started = training, started

    def on_train_start(self, trainer, pl_module):
        self.training.set()

    def on_train_end(self, trainer, pl_module):
        assert self.started.wait(120), "the second job never started"
        time.sleep(3.0)  # the second job is now at the run folder


def _train_same_run(cfg, run_dir, first, training, started, results):
    """One of two jobs wanting the same run (a spawned process); the second starts while the
    first trains."""
    if first:
        callbacks = [_HoldTheRun(training, started)]
    else:
        assert training.wait(120), "the first job never trained"
        started.set()
        callbacks = []
    results["first" if first else "second"] = run_training(cfg, run_dir, callbacks=callbacks)


@pytest.mark.slow
def test_two_jobs_wanting_the_same_run_train_it_once(ani1x_file, tmp_path):
    cfg = make_cfg(ani1x_file, "stage=teacher", "trainer.max_epochs=1", SMALL_ANI)
    run_dir = tmp_path / "run"
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        training, started, results = manager.Event(), manager.Event(), manager.dict()
        jobs = [context.Process(target=_train_same_run,
                                args=(cfg, run_dir, first, training, started, results))
                for first in (True, False)]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join(300)
        assert [job.exitcode for job in jobs] == [0, 0]
        first, second = dict(results["first"]), dict(results["second"])
    assert first == second
    assert [p.name for p in (run_dir / cfg.run_name).iterdir()] == ["version_0"]  # one model trained
    assert _metrics(run_dir) == first


# ----------------------------------------------------------------------------- submitit
def test_slurm_launcher_follows_the_trainer():
    with initialize_config_module(config_module="ekd_lightning.conf", version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "stage=student",
            "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    # Lightning under SLURM: one task per device on each node
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu" and launcher.timeout_min > 0


FAKE_SLURM = {  # just enough of SLURM's commands for submitit to submit and poll
    "sbatch": 'cp "${@: -1}" "$FAKE_SLURM_DIR/job.sbatch"\necho "Submitted batch job 42"',
    "srun": "exit 1",
    "sacct": 'echo "JobID|State|NodeList"; echo "42_0|FAILED|n1"; echo "42_1|FAILED|n1"',
}


@pytest.mark.slow
def test_documented_slurm_sweep_submits_one_task_per_gpu(tmp_path):
    """The command of docs/clusters.md, against stand-ins for sbatch/srun/sacct that record the batch
    script and report the jobs failed (no cluster here): two array jobs, each 2 nodes x 4 tasks
    x 4 GPUs, with the sweep's overrides."""
    import pickle

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = _env(FAKE_SLURM_DIR=str(tmp_path), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm",
         "hydra.launcher.partition=gpu", "stage=student", "distill.labels=labels.h5",
         "loss.forces.weight=0.1,1", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env)
    assert "42_0" in result.stderr and "FAILED" in result.stderr, result.stderr[-3000:]
    script = (tmp_path / "job.sbatch").read_text()
    for option in ("--array=0-1", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                   "--partition=gpu", "--time=240"):
        assert f"#SBATCH {option}" in script, option
    overrides = [pickle.loads(p.read_bytes()).args[0]
                 for p in sorted(sweep.glob(".submitit/42_*/42_*_submitted.pkl"))]
    assert [[o for o in job if o.startswith("loss.")] for job in overrides] == [
        ["loss.forces.weight=0.1"], ["loss.forces.weight=1"]]


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_two_job_sweep(ani1x_file, tmp_path):
    labels = write_label_file(tmp_path / "labels.h5", ani1x_file, "emt.energy", "emt.forces")
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=local", "stage=student",
         "loss.forces.weight=0.01,1", f"hydra.sweep.dir={sweep}", f"data.path={ani1x_file}",
         *DATA, f"distill.labels={labels}", "trainer.max_epochs=1", "model=schnet",
         "model.num_interactions=1", "model.hidden_channels=16",
         "model.num_filters=16"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env=_env(),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    weights = [json.loads((r / "run_info.json").read_text())["config"]["loss"]["forces"]["weight"]
               for r in runs]
    assert weights == [0.01, 1]
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2  # each job went through submitit


SMALL_PIPELINE = ("pipeline.teachers.models=[ani2x]", "pipeline.seeds=[0]", "pipeline.oracle=false",
                  "pipeline.md.steps=0", "pipeline.teachers.max_epochs=1", "pipeline.max_epochs=1",
                  SMALL_ANI)


def without_wall_times(report: dict) -> dict:
    """The report less what is measured in wall time (step timings, inference time per
    conformation, each run's training time): the rest must be identical between runners."""
    report = {k: v for k, v in report.items() if k not in ("timings_s", "inference_s_per_conformation")}
    report["training"] = {name: {k: v for k, v in run.items() if k != "train_time_s"}
                          for name, run in report["training"].items()}
    return report


@pytest.mark.slow
def test_pipeline_with_submitit_jobs_reports_as_the_local_runner(ani1x_file, comp6_file, tmp_path):
    local = pipeline_cfg(ani1x_file, comp6_file, tmp_path / "store_local", *SMALL_PIPELINE,
                         "pipeline.workers=1")
    jobs = pipeline_cfg(ani1x_file, comp6_file, tmp_path / "store", *SMALL_PIPELINE,
                        "pipeline.runner=submitit", "pipeline.submitit.cluster=local")
    from ekd_lightning.workflow.pipeline import run_pipeline

    expected = run_pipeline(local[0], tmp_path / "local", local[1])
    report = run_pipeline(jobs[0], tmp_path / "jobs", jobs[1])
    submitted = sorted((tmp_path / "store/submitit").glob("*_submitted.pkl"))
    assert len(submitted) == 3  # teacher, student, baseline: one job each
    expected = without_wall_times(expected)
    assert without_wall_times(report) == expected
    assert expected["training"]["student-seed0"]["epochs"] == 1
    again = run_pipeline(jobs[0], tmp_path / "jobs", jobs[1])  # a restart finds the finished runs in the store
    assert sorted((tmp_path / "store/submitit").glob("*_submitted.pkl")) == submitted
    assert without_wall_times(again) == expected


# ----------------------------------------------------------------------------- GPU path
class _WhereItRan(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.device = pl_module.device.type


def test_trainer_config_trains_on_its_device(ani1x_file, tmp_path, device):
    """trainer=cpu trains on the CPU, trainer=gpu on the visible GPU; the checkpoint gives the
    same energies and forces on the CPU (float32 tolerance)."""
    from ekd_lightning.data import EKDDataModule
    from ekd_lightning.task.checkpoint import load_potential

    trainer = {"cpu": "trainer=cpu", "cuda": "trainer=gpu"}[device]
    cfg = make_cfg(ani1x_file, trainer, "stage=teacher", "trainer.max_epochs=1", SMALL_ANI)
    where = _WhereItRan()
    metrics = run_training(cfg, tmp_path, callbacks=[where])
    assert where.device == device
    assert 0 < metrics["val/energy_mae"] < 1e4
    module = load_potential(metrics["best_checkpoint"])
    dm = EKDDataModule(str(ani1x_file), "emt.energy", batch_size=32)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    energies, forces = module(batch)
    on_device, forces_on_device = module.to(device)(batch.to(device))
    torch.testing.assert_close(on_device.cpu(), energies, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(forces_on_device.cpu(), forces, rtol=1e-4, atol=1e-5)
