"""Lightning training from Hydra configs: teacher and student fits, checkpoints, the CLI."""

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from hydra import compose, initialize_config_module

from conftest import SCHNET, write_label_file
from ekd_lightning.core.errors import CheckpointError, ConfigError
from ekd_lightning.data import EKDDataModule
from ekd_lightning.inference.teachers import verify_teachers
from ekd_lightning.models.ani import ANIModel
from ekd_lightning.task.checkpoint import load_potential
from ekd_lightning.task.module import FeatureCache
from ekd_lightning.train.training import (
    build_datamodule,
    build_module,
    register_resolvers,
    run_training,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL_ANI = "model.hidden={H:[32,32],C:[32,32],N:[32,32],O:[32,32]}"


def make_cfg(data_file, *overrides):
    register_resolvers()
    with initialize_config_module(config_module="ekd_lightning.conf", version_base="1.3"):
        return compose("train", overrides=[
            f"data.path={data_file}", "data.energy_key=emt.energy", "data.force_key=emt.forces",
            "data.batch_size=16", "logger=csv", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", *overrides,
        ])


def epoch_metrics(run_dir: Path, key: str) -> list[float]:
    rows = list(csv.DictReader(open(next(run_dir.glob("*/version_*/metrics.csv")))))
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.fixture(scope="module")
def teacher_run(ani1x_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("teacher")
    cfg = make_cfg(ani1x_file, "stage=teacher", "trainer.max_epochs=8", SMALL_ANI, "optim.lr=3e-3")
    return run_dir, run_training(cfg, run_dir)


def test_teacher_loss_goes_down(teacher_run):
    run_dir, metrics = teacher_run
    val = epoch_metrics(run_dir, "val/loss")
    assert len(val) == 8 and val[-1] < 0.5 * val[0]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert {"test/energy_mae", "test/force_mae", "val/energy_rmse"} <= set(metrics)
    info = (run_dir / "run_info.json").read_text()
    assert "dataset_sha256" in info and "emt.energy" in info


@pytest.fixture(scope="module")
def teacher_ensemble(ani1x_file, teacher_run, tmp_path_factory):
    """Two energy-only teachers (seeds 0 and 1, 8 epochs): best checkpoints and test metrics."""
    run_dir = tmp_path_factory.mktemp("teacher1")
    cfg = make_cfg(ani1x_file, "stage=teacher", "trainer.max_epochs=8", SMALL_ANI, "optim.lr=3e-3",
                   "seed=1")
    metrics = run_training(cfg, run_dir)
    runs = [(teacher_run[0], teacher_run[1]), (run_dir, metrics)]
    return [str(r / "checkpoints" / "best.ckpt") for r, _ in runs], [m for _, m in runs]


def test_student_on_distilled_labels_beats_energy_only_baseline(ani1x_file, teacher_ensemble,
                                                                tmp_path):
    """EKD on the fixture: a student trained (4 epochs) on the reference energies and the force
    labels the two teachers distil before its first epoch reaches the teachers' force error and
    beats the energy-only baseline of its own recipe (measured 29.2 vs 41.8 kcal/mol/Å,
    teachers 29.6)."""
    checkpoints, teacher_metrics = teacher_ensemble
    recipe = ("trainer.max_epochs=4", SMALL_ANI, "optim.lr=3e-3")
    student = run_training(make_cfg(ani1x_file, "stage=student", "loss.forces.weight=1.0",
                                    f"distill.teachers=[{','.join(checkpoints)}]", *recipe),
                           tmp_path / "student")
    labels = json.loads((tmp_path / "student" / "run_info.json").read_text())["labels"]
    assert labels == str(tmp_path / "student" / "labels.h5")
    verify_teachers(labels, checkpoints)  # distilled by these two teachers, in this order
    baseline = run_training(make_cfg(ani1x_file, "stage=baseline", *recipe), tmp_path / "baseline")
    teachers = [m["test/force_mae"] for m in teacher_metrics]
    assert student["test/force_mae"] < 0.85 * baseline["test/force_mae"]
    assert student["test/force_mae"] < 1.15 * min(teachers)


def test_oracle_on_true_forces_beats_energy_only_teacher(ani1x_file, teacher_run, tmp_path):
    """The upper bound: the same recipe on the data's true forces (stage=oracle)."""
    cfg = make_cfg(ani1x_file, "stage=oracle", "trainer.max_epochs=4", SMALL_ANI, "optim.lr=3e-3",
                   "loss.forces.weight=1.0")
    metrics = run_training(cfg, tmp_path / "oracle")
    val = epoch_metrics(tmp_path / "oracle", "val/loss")
    assert val[-1] < val[0]
    assert metrics["test/force_mae"] < 0.7 * teacher_run[1]["test/force_mae"]


class WarmupProbe(pl.Callback):
    """Records, per epoch, the force weight, each training loss next to the loss recomputed with
    that weight, and the logged ``val/loss`` next to the one recomputed with the final weight."""

    def __init__(self):
        self.weights, self.train, self.val = [], [], []

    @staticmethod
    def expected(module, batch, force_weight: float) -> float:
        energies, forces = module(batch)
        terms = module.loss_terms
        loss = terms["energy"].weight * terms["energy"](energies, forces, batch)
        return float(loss + force_weight * terms["forces"](energies, forces, batch))

    def on_train_epoch_start(self, trainer, module):
        self.weights.append(module.term_weights()["forces"])

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batch = batch

    def on_before_backward(self, trainer, module, loss):
        self.train.append((float(loss.detach()), self.expected(module, self.batch, self.weights[-1])))

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        total = count = 0.0
        for batch in itertools.islice(trainer.val_dataloaders, trainer.num_val_batches[0]):
            total += self.expected(module, batch, module.loss_terms["forces"].weight) * batch.num_graphs
            count += batch.num_graphs
        self.val.append((float(trainer.callback_metrics["val/loss"]), total / count))


def test_force_weight_warmup_ramps_training_and_validation_uses_the_final_weight(ani1x_file,
                                                                                 tmp_path):
    """Warm-up over 3 epochs: the training loss weights forces by 1/3, 2/3, 1 of 0.5; val/loss
    (watched by ModelCheckpoint and ReduceLROnPlateau) uses 0.5 from the first epoch on."""
    labels = write_label_file(tmp_path / "labels.h5", ani1x_file, "emt.energy", "emt.forces")
    cfg = make_cfg(ani1x_file, "stage=student", f"distill.labels={labels}", SMALL_ANI,
                   "loss.forces.weight=0.5", "loss.forces.warmup_epochs=3", "trainer.max_epochs=4",
                   "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2")
    probe = WarmupProbe()
    run_training(cfg, tmp_path / "run", callbacks=[probe])
    assert probe.weights == pytest.approx([0.5 / 3, 1.0 / 3, 0.5, 0.5])
    assert len(probe.train) == 8 and len(probe.val) == 4
    for logged, expected in probe.train + probe.val:
        assert logged == pytest.approx(expected, rel=1e-5)


def test_student_without_labels_is_refused(ani1x_file, tmp_path):
    # without a default teacher ensemble there is nothing to distil from
    with pytest.raises(ConfigError, match="distill.labels"):
        run_training(make_cfg(ani1x_file, "stage=student", "~distill.default_teachers"), tmp_path)


def test_teacher_from_cached_features_equals_teacher_from_positions(ani1x_file, teacher_run,
                                                                   tmp_path):
    """The teacher run keeps its AEVs across epochs (feature_cache_mb, on by default); trained
    without the cache, the same run ends with the same weights to float32 rounding (an AEV
    computed within another batch can differ in its last bit: vectorised kernels treat the
    tail of a tensor apart)."""
    cfg = make_cfg(ani1x_file, "stage=teacher", "trainer.max_epochs=8", SMALL_ANI, "optim.lr=3e-3",
                   "feature_cache_mb=0")
    run_training(cfg, tmp_path)
    cached = torch.load(teacher_run[0] / "checkpoints" / "last.ckpt", weights_only=False)
    plain = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert cached["state_dict"].keys() == plain["state_dict"].keys()
    for key, value in cached["state_dict"].items():
        torch.testing.assert_close(value, plain["state_dict"][key], rtol=0, atol=1e-6)


def test_compiled_visnet_teacher_trains_to_the_eager_weights(ani1x_file, tmp_path, monkeypatch):
    """compile=true runs ViSNet's representation through torch.compile in training mode: the
    compiled graph is the one the training steps call, and the run ends with the eager run's
    weights to float32 rounding (same keys: the checkpoint is an eager model's); the config
    hash keeps compile=false runs where they were and tells compile=true ones apart."""
    from ekd_lightning.models.visnet import ViSNetModel
    from ekd_lightning.train.training import config_sha256

    visnet = ("stage=teacher", "model=visnet_small", "trainer.max_epochs=2", "model.hidden_channels=16",
              "data.batch_size=32")
    calls = {"compiled": 0}
    original = ViSNetModel.atomic_contributions

    def counting(self, species, pos, batch, pairs=None):
        if self.training and self.compiled_representation is not None:
            calls["compiled"] += 1
        return original(self, species, pos, batch, pairs)

    monkeypatch.setattr(ViSNetModel, "atomic_contributions", counting)
    eager_cfg, compiled_cfg = (make_cfg(ani1x_file, *visnet, f"compile={c}") for c in ("false", "true"))
    run_training(eager_cfg, tmp_path / "eager")
    assert calls["compiled"] == 0
    run_training(compiled_cfg, tmp_path / "compiled")
    assert calls["compiled"] >= 2  # every training step of both epochs
    eager, compiled = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
                       for d in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-4, atol=1e-5)
    without = make_cfg(ani1x_file, *visnet, "~compile")  # as the runs stored before the key
    assert config_sha256(eager_cfg) == config_sha256(without) != config_sha256(compiled_cfg)


def test_feature_cache_fills_reuses_and_stops_at_its_size(ani1x_file):
    cfg = make_cfg(ani1x_file, "stage=teacher", SMALL_ANI)
    dm = build_datamodule(cfg)
    dm.setup()
    module = build_module(cfg, dm).train()
    split = dm.datasets["train"]
    batch = next(iter(dm.train_dataloader()))
    expected = module(batch, with_forces=False)[0]
    cache = module.feature_cache
    assert cache.energies(module.model, batch) is None  # not filled: the usual path
    rng = torch.get_rng_state()
    cache.fill(module.model, split, dm.batch_size)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is untouched
    assert len(cache.rows) == len(split) and cache.nbytes > 0 and not cache.full
    first = cache.energies(module.model, batch)
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-9)  # to float32 rounding
    loss, _, forces = module.loss(batch, create_graph=True)  # the training loss takes this path
    assert forces is None and torch.equal(loss, module.loss_terms["energy"](first, None, batch))
    split_bytes = sum(rows.nbytes for rows in cache.rows.values())
    small = FeatureCache(max_bytes=split_bytes // 2)
    small.SLAB_BYTES = split_bytes // 8
    small.fill(module.model, split, dm.batch_size)
    assert small.full and 0 < len(small.rows) < len(split) and small.nbytes <= split_bytes // 2
    held = {key: rows.clone() for key, rows in small.rows.items()}  # the first ones, in order
    assert all(key in cache.rows and torch.equal(rows, cache.rows[key]) for key, rows in held.items())
    missing = next(i for i in range(len(split)) if tuple(split[i].mol.tolist() + split[i].conf.tolist())
                   not in small.rows)
    assert small.energies(module.model, split.__getitems__([missing])) is None  # full: usual path
    module.on_fit_end()  # the memory is handed back after training
    assert not cache.rows and not cache.slabs


def test_checkpoint_round_trip(teacher_run, ani1x_file):
    run_dir, _ = teacher_run
    module = load_potential(run_dir / "checkpoints" / "best.ckpt")
    again = load_potential(run_dir / "checkpoints" / "best.ckpt", expected_model=ANIModel)
    dm = EKDDataModule(str(ani1x_file), "emt.energy", batch_size=32)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    e1, f1 = module(batch)
    e2, f2 = again(batch)
    assert torch.equal(e1, e2) and torch.equal(f1, f2)
    assert module.hparams.elements == ["H", "C", "N", "O"]
    # the checkpoint carries the self energies fitted on the training split
    assert torch.allclose(module.model.self_energies, torch.tensor(dm.self_energies), atol=1e-9)
    assert float((e1.detach() - batch.energy).abs().mean()) < float((batch.energy - batch.energy.mean()).abs().mean())


def test_bad_checkpoints_are_refused(teacher_run, tmp_path):
    best = teacher_run[0] / "checkpoints" / "best.ckpt"
    with pytest.raises(CheckpointError, match="is a 'ekd_lightning.models.ani.ANIModel' model, "
                       "expected 'ekd_lightning.models.schnet.SchNetModel'"):
        load_potential(best, expected_model=SCHNET)
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(best.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.ckpt: cannot read checkpoint"):
        load_potential(truncated)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an ekd-lightning checkpoint"):
        load_potential(foreign)
    tampered = torch.load(best, weights_only=False)
    tampered["hyper_parameters"]["model"]["hidden"] = {e: [8] for e in "HCNO"}
    torch.save(tampered, tmp_path / "tampered.ckpt")
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_potential(tmp_path / "tampered.ckpt")


def test_cli_student_and_multirun_sweep_restarted_skips_finished_jobs(ani1x_file, tmp_path):
    """A -m sweep with the default hydra.sweep.dir, run twice with the same command: the second
    finds the first's job folders and trains nothing (metrics.json untouched)."""
    labels = write_label_file(tmp_path / "labels.h5", ani1x_file, "emt.energy", "emt.forces")
    common = [f"data.path={ani1x_file}", "data.energy_key=emt.energy", "data.force_key=emt.forces",
              f"distill.labels={labels}", "logger=csv", "trainer.max_epochs=1",
              "trainer.enable_progress_bar=false", "model=schnet", "model.num_interactions=1"]
    command = [sys.executable, str(ROOT / "train.py"), "-m", "stage=student",
               "loss.forces.weight=0.01,1", *common]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.parent for p in (tmp_path / "multirun").glob("*/metrics.json"))
    assert [r.name.split(",")[0] for r in runs] == ["0_data.energy_key=emt.energy", "1_data.energy_key=emt.energy"]
    weights = [yaml.safe_load((r / ".hydra" / "config.yaml").read_text())["loss"]["forces"]["weight"] for r in runs]
    assert weights == [0.01, 1]
    finished = {r: (r / "metrics.json").stat().st_mtime_ns for r in runs}
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {r: (r / "metrics.json").stat().st_mtime_ns for r in runs} == finished
    assert sorted(p.parent for p in tmp_path.rglob("metrics.json")) == runs
    assert (again.stdout + again.stderr).count("already finished with this config") == 2


def test_trainings_in_one_process_get_their_own_wandb_runs(ani1x_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_ids = []
    for seed in (0, 1):
        cfg = make_cfg(ani1x_file, "stage=teacher", "trainer.max_epochs=1", SMALL_ANI,
                       "logger=wandb", "logger.mode=offline", f"seed={seed}")
        run_training(cfg, tmp_path / f"run{seed}")
        offline = list((tmp_path / f"run{seed}" / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, f"run{seed} has no W&B run of its own"
        run_ids.append(offline[0].name)
    assert run_ids[0] != run_ids[1]
