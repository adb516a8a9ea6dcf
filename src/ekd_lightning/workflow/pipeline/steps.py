"""The pipeline's steps after training: teacher labels (and extra geometries, Hessian rows),
the default teacher ensemble of ``ekd-train stage=student``, evaluation and MD stability.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ...analysis.evaluate import (
    evaluate_models,
    evaluate_records,
    label_quality,
)
from ...core.errors import ConfigError
from ...data import EKDDataModule
from ...task.checkpoint import load_potential
from .composition import default_teacher_jobs
from .report import inference_cost
from .runners import Runner, run_job
from .runs import Run, RunSpec, member_checkpoints

log = logging.getLogger(__name__)


def teacher_keyed_path(store: Path, prefix: str, teachers: Sequence[Run], *settings: str) -> Path:
    """``<store>/<prefix>-<sha>.h5``, the sha of the teachers' run folder names (which hold their
    config hashes) and any ``settings`` lines: a file made from the teachers, shared like the
    runs wherever the store is, and never reused for other teachers or settings."""
    text = "\n".join([*(t.run_dir.name for t in teachers), *settings])
    return store / f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:10]}.h5"


def distill(cfg: DictConfig, teachers: Sequence[Run], store: Path) -> Path:
    """Step 2: label every conformation of ``cfg.data`` with the teacher ensemble, into
    ``<store>/labels-<sha>.h5`` named by the teachers' run folder names (which hold their config
    hashes), so shared like the runs, wherever the store is."""
    from ...distill import distill_labels
    from ...distill.config import data_job

    job = data_job(cfg.data, teacher_keyed_path(store, "labels", teachers), member_checkpoints(teachers))
    return distill_labels(job, OmegaConf.to_container(cfg.trainer, resolve=True))


def extra_geometries(cfg: DictConfig, teachers: Sequence[Run], store: Path) -> dict:
    """Step 2b (``pipeline.extra_geometries``, absent by default): teacher-labelled extra
    geometries around the training split, made once into the store
    (:func:`ekd_lightning.distill.augment.make_extra_geometries`, named by their settings and
    the teachers' hashes); returns the students' ``data.extra_geometries``: ``{path, weight,
    variance_floor}``."""
    from ...distill.augment import make_extra_geometries

    spec = OmegaConf.to_container(cfg.pipeline.extra_geometries, resolve=True)
    weights = {"weight": float(spec.pop("weight", 1.0)),
               "variance_floor": float(spec.pop("variance_floor", 1.0))}
    path = make_extra_geometries(
        OmegaConf.to_container(cfg.data, resolve=True), member_checkpoints(teachers),
        store, accelerator=cfg.trainer.get("accelerator", "cpu"), **spec)
    return {"path": str(path), **weights}


def hessian_labels(cfg: DictConfig, teachers: Sequence[Run], store: Path) -> Path:
    """Step 2c (``pipeline.hessian``, absent by default; ``+ablation=hessian``): the teacher
    ensemble's Hessian-vector products along ``directions`` random directions per conformation
    (``kind``: rows or gaussian, ``seed``; :mod:`ekd_lightning.distill.hessian`), into
    ``<store>/hvp-<sha>.h5`` named by the teachers' run folders and those settings, so shared
    and reused like the labels; the students' ``loss.hessian`` term trains on them."""
    from ...distill.hessian import label_teachers

    if "hessian" not in ((cfg.pipeline.get("student_overrides") or {}).get("loss") or {}):
        raise ConfigError("pipeline.hessian labels the students' loss.hessian term: add "
                          "pipeline.student_overrides.loss.hessian (see conf/ablation/hessian.yaml)")
    spec = OmegaConf.to_container(cfg.pipeline.hessian, resolve=True)
    settings = {"directions": int(spec.get("directions", 4)), "kind": spec.get("kind", "rows"),
                "seed": int(spec.get("seed", 0))}
    data = cfg.data
    return label_teachers(
        member_checkpoints(teachers), data.path, data.energy_key,
        teacher_keyed_path(store, "hvp", teachers, json.dumps(settings, sort_keys=True)), settings["directions"],
        settings["seed"], settings["kind"], data.file_format, list(data.elements), data.batch_size)


def default_teacher_labels(cfg: DictConfig, overrides: Sequence[str] | None = None) -> Path:
    """The label file of the default teacher ensemble for a training config with neither
    ``distill.labels`` nor ``distill.teachers`` (``python train.py stage=student``).

    The ensemble is ``distill.default_teachers`` (``conf/ensemble/ekd.yaml``, the teachers of
    ``experiment=ekd``); each teacher is derived from ``cfg`` as the pipeline derives it, so it
    is found in the run store ``distill.store`` by its config hash (trained by a pipeline or an
    earlier student) or trained there now, one after another; the labels are cached there too,
    named by the teachers' hash (:func:`distill`). ``overrides``: those ``cfg`` was composed
    with (None: the running Hydra app's), see :func:`default_teacher_jobs`.
    """
    store = Path(cfg.distill.store)
    jobs = default_teacher_jobs(cfg, overrides)
    ensemble = cfg.distill.default_teachers
    log.info("no distill.labels or distill.teachers: using the default teacher ensemble "
             "(distill.default_teachers: %s, %s epochs) from the run store %s",
             list(ensemble.models), ensemble.max_epochs, store)
    teachers = []
    for i, teacher in enumerate(jobs, 1):
        found = (teacher.run_dir / "metrics.json").is_file()
        log.info("teacher %d/%d: %s %s", i, len(jobs), "found in" if found else "training into",
                 teacher.run_dir)
        teachers.append(run_job(teacher))
    labels = distill(cfg, teachers, store)
    log.info("student labels: %s", labels)
    return labels


def named_models(teachers: Sequence[Run], variants: Mapping[str, Sequence[Run]]) -> dict:
    """``{name: PotentialModule or list (ensemble)}`` of everything the report compares: each
    teacher by its name (a snapshot-ensemble teacher: its last snapshot, the earlier ones as
    ``<name>.<k>``), the ensemble of all members, and the other runs."""
    models: dict[str, object] = {}
    for t in teachers:
        *earlier, last = t.members
        models.update({f"{t.name}.{k}": load_potential(path) for k, path in enumerate(earlier)})
        models[t.name] = load_potential(last)
    models["ensemble"] = list(models.values())
    for run in (run for runs in variants.values() for run in runs):
        models[run.name] = load_potential(run.checkpoint)
    return models


def first_seed_run(runs: Sequence[RunSpec], role: str, seed: int) -> str | None:
    """The name of the run of ``role`` with ``seed`` among ``runs`` (None if there is none)."""
    return next((r.name for r in runs if r.role == role and r.seed == seed), None)


def evaluate(cfg: DictConfig, models: Mapping[str, object], labels: Path, out: Path,
             runs: Sequence[RunSpec] = ()) -> dict:
    """Step 4: metrics on the held-out split and on the test file, the labels' quality, and the
    inference time per conformation of the student, the baseline (``runs`` of the first seed)
    and the teacher ensemble; ``runs`` give the models' roles in the figures."""
    data = cfg.data
    datamodule = EKDDataModule(**OmegaConf.to_container(data, resolve=True))
    datamodule.setup("fit")
    split = cfg.pipeline.heldout_split
    records = datamodule.split_records(split)
    roles = {**{run.name: run.role for run in runs}, "ensemble": "ensemble"}
    results = {"heldout": evaluate_records(
        models, records, out / "heldout",
        about={"dataset": str(data.path), "split": split, "energy_key": data.energy_key,
               "force_key": data.force_key}, roles=roles)}
    first = cfg.pipeline.seeds[0]
    timed = [first_seed_run(runs, "student", first), first_seed_run(runs, "baseline", first)]
    results["inference_s_per_conformation"] = inference_cost(
        models, records, [*(name for name in timed if name), "ensemble"])
    test = cfg.pipeline.get("test_data")
    if test and test.get("path"):
        path = OmegaConf.to_container(test.path) if OmegaConf.is_list(test.path) else test.path
        results["test"] = evaluate_models(  # a file, a folder (all of COMP6) or a list of them
            models, path, test.energy_key, test.get("force_key"), test.file_format,
            list(data.elements), out / "test", forces_are_gradients=test.get("forces_are_gradients"),
            roles=roles)
    if data.get("force_key"):
        results["labels"] = label_quality(labels, data.path, data.energy_key, data.force_key,
                                          data.file_format, list(data.elements))
    return results


def md_stability(cfg: DictConfig, runs: Sequence[Run], out: Path, runner: Runner) -> list[dict]:
    """Step 5: batched Langevin MD stability (:func:`ekd_lightning.analysis.stability.stability_table`:
    Kaplan-Meier survival per model and temperature, log-rank test against the baseline, h(r)
    error against cached GFN2-xTB MD and, with ``md.reference_replicas``, GFN2-xTB run under the
    same test: its survival beside each model's, the log-rank test against it and the failure
    modes per molecule) and NVE drift of baseline vs student (vs oracle), one (model,
    temperature) task per worker process; the rows of a checkpoint already run with the same
    settings (a baseline shared by ablation variants) are reused."""
    from ...analysis.md import default_molecules
    from ...analysis.stability import stability_table

    md = cfg.pipeline.md
    chosen = {run.name: str(run.checkpoint) for run in runs
              if run.spec.role in md.variants and run.spec.seed == md.seed}
    baseline = first_seed_run([run.spec for run in runs if run.name in chosen], "baseline", md.seed)
    rows, _ = stability_table(
        chosen, default_molecules(list(md.molecules)), list(md.temperatures), engine="batched",
        replicas=md.replicas, steps=md.steps, nve_steps=md.nve_steps, reference=baseline,
        reference_replicas=md.get("reference_replicas", 0), reference_steps=md.reference_steps,
        reference_cache=Path(cfg.pipeline.store) / "md-reference",
        barriers=md.get("barriers", False), out_dir=out / "md", map_fn=runner.map, cache=True)
    return rows
