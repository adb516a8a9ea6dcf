"""Distilling Hessian-vector products (ekd_lightning.distill.hessian): teacher HVPs against finite
differences of the ensemble's forces, the student loss term ``loss.hessian`` (zero at the
teacher, gradient against finite differences), seeded directions, the wiring into training
(training only, checkpoints, reuse) and the pipeline."""

import copy
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import write_ani1x_file, write_label_file
from ekd_lightning.core.errors import ConfigError, DataError
from ekd_lightning.core.hashing import cached_sha256
from ekd_lightning.data import EKDDataModule
from ekd_lightning.distill import TeacherEnsemble
from ekd_lightning.distill.hessian import (
    HessianLoss,
    directions,
    ensemble_hvp,
    hvp_labels,
    label_teachers,
    write_hvp_labels,
)
from ekd_lightning.models import instantiate_model
from ekd_lightning.train.training import (
    build_datamodule,
    build_module,
    finished_metrics,
    run_training,
)
from test_training import make_cfg

ENERGY = "emt.energy"
TINY = {"_target_": "ekd_lightning.models.ani.ANIModel", "hidden": {e: [16, 8] for e in "HCNO"}}
TERM = "ekd_lightning.distill.hessian.HessianLoss"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 molecules x 6 EMT conformations (ANI-1x layout)."""
    return write_ani1x_file(tmp_path_factory.mktemp("hvp_data") / "data.h5", n_conf=6, seed=5,
                            molecules=["CH4", "H2O", "CH3OH", "CH3CHO"])


@pytest.fixture(scope="module")
def dm(data) -> EKDDataModule:
    module = EKDDataModule(str(data), ENERGY, batch_size=8)
    module.setup()
    return module


def tiny_ani(seed: int, dm: EKDDataModule, dtype=torch.float64):
    torch.manual_seed(seed)
    model = instantiate_model(TINY, dm.elements)
    model.set_energy_statistics(dm.self_energies.tolist(), dm.energy_scale)
    return model.to(dtype).eval().requires_grad_(False)


def sizes(dm: EKDDataModule) -> dict[str, int]:
    return {r.key: r.num_conformations for r in dm.records}


def hvp_file(path: Path, models, dm: EKDDataModule, k: int = 3, seed: int = 1) -> Path:
    groups = hvp_labels(models, dm.records, sizes(dm), k=k, seed=seed, kind="gaussian", batch_size=8)
    return write_hvp_labels(path, groups, {"kind": "gaussian", "directions": k, "seed": seed})


def test_teacher_hvp_equals_finite_differences_of_the_ensemble_forces(dm):
    models = [tiny_ani(s, dm) for s in range(3)]
    batch = next(iter(dm.all_dataloader()))
    pos = batch.pos.double()
    v = torch.randn(2, *pos.shape, dtype=torch.float64)
    hv = ensemble_hvp(models, batch.z, pos, batch.batch, batch.num_graphs, v)
    ensemble = TeacherEnsemble(models)  # analytic forces of the stacked ensemble (float64)
    h = 1e-5  # truncation error ~h²: 2e-5 at h = 1e-4 for these unnormalised v
    for k in range(2):
        _, plus = ensemble(batch.z, pos + h * v[k], batch.batch, batch.num_graphs)
        _, minus = ensemble(batch.z, pos - h * v[k], batch.batch, batch.num_graphs)
        # forces are -dE/dx of each teacher: their mean's directional derivative is -H v
        fd = -(plus.mean(0) - minus.mean(0)) / (2 * h)
        np.testing.assert_allclose(hv[k].numpy(), fd.numpy(), rtol=1e-6, atol=1e-8)
    assert float(hv.abs().max()) > 1e-3  # not trivially zero


def test_directions_are_reproducible_from_the_seed(dm):
    rows = directions(3, "CH3OH", 4, 6, 5, "rows")
    assert rows.shape == (5, 6, 3)
    np.testing.assert_array_equal(rows, directions(3, "CH3OH", 4, 6, 5, "rows"))
    flat = rows.reshape(5, -1)
    assert (flat.sum(1) == 1).all() and ((flat == 0) | (flat == 1)).all()
    assert len({int(i) for i in flat.argmax(1)}) == 5  # distinct Hessian rows
    gauss = directions(3, "CH3OH", 4, 6, 5, "gaussian")
    np.testing.assert_allclose(np.linalg.norm(gauss.reshape(5, -1), axis=1), 1, rtol=1e-6)
    for other in (directions(4, "CH3OH", 4, 6, 5, "gaussian"), directions(3, "CH3OH", 5, 6, 5, "gaussian"),
                  directions(3, "CH4", 4, 6, 5, "gaussian")):
        assert not np.allclose(gauss, other)
    # the labels' directions do not depend on batching
    models = [tiny_ani(0, dm, torch.float32)]
    a = hvp_labels(models, dm.records, sizes(dm), 2, seed=7, kind="rows", batch_size=8)
    b = hvp_labels(models, dm.records, sizes(dm), 2, seed=7, kind="rows", batch_size=5)
    for key in a:
        np.testing.assert_array_equal(a[key]["directions"], b[key]["directions"])
        np.testing.assert_allclose(a[key]["hvp"], b[key]["hvp"], rtol=1e-4, atol=1e-6)
        assert a[key]["labelled"].all()
    with pytest.raises(ValueError, match="lower pipeline.hessian.directions"):
        directions(0, "H2", 0, 2, 7, "rows")


def test_student_term_is_zero_at_the_teacher_and_its_gradient_matches_finite_differences(dm, tmp_path, device):
    """Mutations caught: ``hv + target`` (sign) -> not zero at the teacher; no ``create_graph``
    on the second backward -> no gradient to the weights. On the CPU and on CUDA (the labels
    stay on the CPU, the batch and model on the device)."""
    teacher = tiny_ani(0, dm)
    path = hvp_file(tmp_path / "hvp.h5", [teacher], dm)
    term = HessianLoss(str(path), weight=2.0, fraction=0.5, seed=3)
    term.setup(dm)
    batch = next(iter(dm.datasets["train"].loader(8, shuffle=False))).to(device)
    twin = copy.deepcopy(teacher).to(device)
    assert float(term(None, None, batch, model=twin).detach()) < 1e-6  # float32 labels, float64 teacher
    student = tiny_ani(1, dm).to(device).requires_grad_(True)
    term.generator.manual_seed(11)
    value = term(None, None, batch, model=student)
    assert float(value.detach()) > 1.0
    param = next(p for p in student.parameters() if p.dim() == 2)
    (grad,) = torch.autograd.grad(value, param)
    rng = np.random.default_rng(0)
    for _ in range(3):
        i, j = (int(rng.integers(n)) for n in param.shape)
        eps = 1e-6
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                param[i, j] += sign * eps
            term.generator.manual_seed(11)  # the same molecules and directions
            values.append(float(term(None, None, batch, model=student)))
            with torch.no_grad():
                param[i, j] -= sign * eps
        fd = (values[0] - values[1]) / (2 * eps)
        assert float(grad[i, j]) == pytest.approx(fd, rel=1e-4, abs=1e-6)


def val_loss(module, datamodule, tmp_path) -> float:
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), inference_mode=False)
    return trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]


def test_term_trains_only_rebuilds_from_checkpoints_and_bad_inputs(data, dm, tmp_path):
    """``loss.hessian`` adds weight x term to the training loss and nothing to ``val/loss``
    (mutation caught: ``validated = True``, the term in validation: val/loss changes); a
    checkpoint rebuilds the term from its config; a changed HVP file is an input change (the
    finished run is not reused); bad files and configs give one-line errors."""
    from ekd_lightning.task.checkpoint import load_potential

    labels = write_label_file(tmp_path / "labels.h5", data, ENERGY, "emt.forces")
    path = hvp_file(tmp_path / "hvp.h5", [tiny_ani(0, dm, torch.float32)], dm)
    base = ["stage=student", f"distill.labels={labels}", "model.hidden={H:[16],C:[16],N:[16],O:[16]}",
            "trainer.max_epochs=1", "data.batch_size=8"]
    term_cfg = f"+loss.hessian={{_target_: {TERM}, labels: '{path}', weight: 1.0e-3, fraction: 0.5}}"
    cfg = make_cfg(data, *base, term_cfg)
    datamodule = build_datamodule(cfg)
    datamodule.setup()
    module = build_module(cfg, datamodule)
    term = module.loss_terms["hessian"]
    term.setup(datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    with_term, _, _ = module.loss(batch, create_graph=True)
    term.generator.manual_seed(0)
    value = 1e-3 * float(term(None, None, batch, model=module.model))
    plain_module = build_module(make_cfg(data, *base), datamodule)
    plain_module.load_state_dict(module.state_dict())  # the same weights, without the term
    plain, _, _ = plain_module.loss(batch, create_graph=True)
    assert value > 0 and float(with_term) == pytest.approx(float(plain) + value, rel=1e-4)
    # validation (the stopping rule's val/loss) is the plain student's
    assert val_loss(module, datamodule, tmp_path) == pytest.approx(val_loss(plain_module, datamodule, tmp_path), rel=1e-6)

    metrics = run_training(cfg, tmp_path / "run")
    assert np.isfinite(metrics["train/loss"])
    loaded = load_potential(metrics["best_checkpoint"]).loss_terms["hessian"]
    assert isinstance(loaded, HessianLoss) and (loaded.labels, loaded.weight, loaded.fraction) == (str(path), 1e-3, 0.5)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["hvp_labels"] == str(path) and info["hvp_labels_sha256"]
    assert finished_metrics(cfg, tmp_path / "run") is not None
    hvp_file(path, [tiny_ani(1, dm, torch.float32)], dm)  # other HVP labels at the same path
    assert finished_metrics(cfg, tmp_path / "run") is None

    # the pipeline step's labelling from teacher checkpoints (here the trained run's)
    made = label_teachers([metrics["best_checkpoint"]], data, ENERGY, tmp_path / "teachers.h5", 2, 0, "rows")
    with h5py.File(made) as f:
        assert f.attrs["dataset_sha256"] == cached_sha256(data)
        assert all(f[r.key]["labelled"][()].all() and np.isfinite(f[r.key]["hvp"][()]).all() for r in dm.records)
    HessianLoss(str(made)).setup(datamodule)
    with h5py.File(made, "a") as f:
        f.attrs["dataset_sha256"] = "0" * 64
    with pytest.raises(DataError, match="HVP labels made for another dataset"):
        HessianLoss(str(made)).setup(datamodule)

    with pytest.raises(ConfigError, match="loss.hessian.labels: the term needs an HVP label file"):
        HessianLoss(None).setup(datamodule)
    with pytest.raises(ConfigError, match=r"loss.hessian.fraction=0: must be in \(0, 1\]"):
        build_module(make_cfg(data, *base, term_cfg, "loss.hessian.fraction=0"), datamodule)
    with pytest.raises(DataError, match="not an HVP label file"):
        HessianLoss(str(labels)).setup(datamodule)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "ekd-hvp"
    with pytest.raises(DataError, match="other.h5: no group"):
        HessianLoss(str(tmp_path / "other.h5")).setup(datamodule)


def test_hessian_ablation_changes_the_students_only(tmp_path):
    """``+ablation=hessian`` leaves every teacher, baseline and oracle run of the converged
    comparison in place (same folder in the store) and gives the students ``loss.hessian`` with
    the HVP file, so a student's hash follows the file. Mutation caught: the pipeline not
    passing the HVP file to the students (their loss.hessian lacks ``labels``)."""
    from ekd_lightning.workflow.compose import compose_train
    from ekd_lightning.workflow.pipeline import hessian_labels, teacher_jobs, variant_jobs

    runs, hvp = {}, tmp_path / "hvp.h5"
    for name in ("converged", "hessian"):
        command = ["experiment=ekd", f"+ablation={name}"]
        cfg = compose_train(command)
        jobs = [*teacher_jobs(cfg, tmp_path, command), *variant_jobs(cfg, "baseline", tmp_path, None, command),
                *variant_jobs(cfg, "oracle", tmp_path, None, command),
                *variant_jobs(cfg, "student", tmp_path, tmp_path / "labels.h5", command, None,
                              hvp if name == "hessian" else None)]
        runs[name] = {j.name: j for j in jobs}
    for job_name, job in runs["converged"].items():
        same = runs["hessian"][job_name].run_dir == job.run_dir
        assert same == (not job_name.startswith("student")), job_name
        assert "hessian" not in job.cfg["loss"]
    for seed in (0, 1):
        student = runs["hessian"][f"student-seed{seed}"].cfg["loss"]["hessian"]
        assert student == {"_target_": TERM, "labels": str(hvp), "weight": 1e-3, "fraction": 0.25, "seed": seed}
    other = variant_jobs(cfg, "student", tmp_path, tmp_path / "labels.h5", command, None, tmp_path / "hvp2.h5")
    assert other[0].run_dir != runs["hessian"]["student-seed0"].run_dir
    plain = compose_train(["experiment=ekd", "+ablation=converged", "+pipeline.hessian.directions=4"])
    with pytest.raises(ConfigError, match="add pipeline.student_overrides.loss.hessian"):
        hessian_labels(plain, [], tmp_path)


def test_resumed_run_draws_what_an_uninterrupted_one_would(data, dm, tmp_path):
    """The term's generator state is saved in checkpoints: a run trained 1 epoch and extended
    to 2 (resumed from its last checkpoint) ends with the weights of a run trained 2 epochs at
    once. Mutation caught: ``HessianLoss.state_dict`` returning {} (the resumed run redraws the
    molecules and directions from the seed: other weights)."""
    labels = write_label_file(tmp_path / "labels.h5", data, ENERGY, "emt.forces")
    path = hvp_file(tmp_path / "hvp.h5", [tiny_ani(0, dm, torch.float32)], dm)
    base = ["stage=student", f"distill.labels={labels}", "model.hidden={H:[16],C:[16],N:[16],O:[16]}",
            "data.batch_size=8", f"+loss.hessian={{_target_: {TERM}, labels: '{path}', weight: 1.0, fraction: 0.5}}"]
    run_training(make_cfg(data, *base, "trainer.max_epochs=1"), tmp_path / "resumed")
    resumed = run_training(make_cfg(data, *base, "trainer.max_epochs=2"), tmp_path / "resumed")
    fresh = run_training(make_cfg(data, *base, "trainer.max_epochs=2"), tmp_path / "fresh")

    def weights(run):
        return torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu",
                          weights_only=False)["state_dict"]

    assert resumed["epochs"] == fresh["epochs"] == 2
    a, b = weights("resumed"), weights("fresh")
    assert all(torch.equal(a[k], b[k]) for k in a)
