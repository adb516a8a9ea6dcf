"""The whole EKD pipeline in one command: ``python train.py experiment=ekd``.

Steps (each resumable: a finished step is skipped when the command is run again):

1. **teachers**: energy-only models, one per entry of ``pipeline.teachers.models`` (any mix of
   architectures), each with its own seed and, optionally, its own random subset of the
   training split (``pipeline.teachers.train_fraction``); folder ``teachers/teacherN``.
2. **distill**: the teacher ensemble labels every conformation of the dataset with the mean
   force and the spread (:mod:`ekd_lightning.distill`); ``labels.h5``.
3. **student**: reference energies + distilled forces; **baseline**: the same recipe on energies
   only; **oracle** (when the data has true forces): the same recipe on the true forces. Each
   with the seeds ``pipeline.seeds``; folders ``student/seedS`` etc.
4. **evaluate**: every model (teachers, the teacher ensemble, students, baselines, oracles) on
   the held-out conformations of the training molecules (``report/heldout``) and on the
   out-of-sample test file (``report/test``, COMP6 layout), plus the quality of the distilled
   labels against the true forces where the dataset has them.
5. **md**: Langevin MD stability and NVE drift of baseline vs student (vs oracle).
6. **report**: ``report/summary.md`` (tables, mean ± spread over seeds, the student against
   baseline, best single teacher, ensemble and oracle, the fraction of the force-error gap
   closed, (baseline − student) / (baseline − oracle), guarded by :func:`gap_verdict`; stop
   epochs, training and inference cost; learning curves and parity figures),
   ``report/summary.json``, printed at the end and logged to W&B when ``logger=wandb``.

Every training run gets the composed config's ``callbacks`` (``experiment=ekd``: the one
early-stopping rule) and the epoch cap ``pipeline.max_epochs``, teachers included.

Training runs are typed records (:class:`RunSpec`: role, stage, model, seed, epoch cap and the
variant's overrides; their names in the report derive from them), each composed by Hydra's
compose API from the same config tree as ``train.py`` with recorded overrides: the pipeline
command's own (less ``pipeline.*``, deleted from the run's config), then
``stage=... model=... seed=... trainer.max_epochs=... run_name=...`` and the variant's (a
teacher's data subset, the student's labels, ``pipeline.force_overrides`` /
``student_overrides`` written as ``++key=value``). Everything else (data, trainer, optim, logger
and their command-line overrides) is shared by all runs. Each run's ``run_info.json`` records
``command``, the ``ekd-train ... hydra.run.dir=<run folder>`` line that composes it again; the
worker processes and submitit jobs get the resolved config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..analysis.evaluate import (
    ALL,
    evaluate_models,
    evaluate_records,
    format_table,
    json_safe,
    label_quality,
    write_text_atomic,
)
from ..core.errors import ConfigError
from ..data import EKDDataModule
from ..task.checkpoint import load_potential
from ..train.training import (
    config_sha256,
    differences,
    logger_arguments,
    run_training,
    write_json_atomic,
)
from .compose import (
    as_overrides,
    command_overrides,
    compose_train,
    override_value,
    parse,
    train_command,
)
from .progress import PipelineProgress
from .wandb_runs import IDENTITY_KEYS, fill_identity, pipeline_run_identity

log = logging.getLogger(__name__)

FORCE_MAE = "force_mae"


@dataclass(frozen=True)
class RunSpec:
    """One training run of the pipeline as a typed record: its role, the ``conf/stage`` and
    ``conf/model`` files, seed and epoch cap it is composed with, and ``variant``, the overrides
    of its variant (a teacher's data subset, the student's labels and loss settings). Its config
    is ``conf/train.yaml`` composed with the pipeline command's overrides and :meth:`overrides`.
    """

    role: str  # teacher | baseline | student | oracle
    stage: str
    model: str
    seed: int
    max_epochs: int
    variant: tuple[str, ...] = ()
    index: int | None = None
    """The teacher's number (``pipeline.teachers.models[index]``); None for the other roles."""

    @property
    def name(self) -> str:
        """The run's name in the report: ``teacher<index>``, else ``<role>-seed<seed>``."""
        return f"teacher{self.index}" if self.role == "teacher" else f"{self.role}-seed{self.seed}"

    def overrides(self) -> list[str]:
        """The run's own overrides (after the command's): stage, model, seed, epoch cap, run
        name (``<stage>-<model>-seed<seed>``) and the variant's."""
        return [f"stage={self.stage}", f"model={self.model}", f"seed={self.seed}",
                f"trainer.max_epochs={self.max_epochs}",
                f"run_name={self.stage}-{self.model}-seed{self.seed}", *self.variant]


@dataclass
class Run:
    """A finished training run: its record, folder, best checkpoint and final metrics."""

    spec: RunSpec
    run_dir: Path
    checkpoint: Path
    metrics: dict

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def members(self) -> list[Path]:
        """The checkpoints this run gives an ensemble: a snapshot-ensemble teacher's snapshots
        (``snapshot-*.ckpt``, one per LR cycle, in epoch order), else its best checkpoint."""
        return sorted((self.run_dir / "checkpoints").glob("snapshot-*.ckpt")) or [self.checkpoint]


def member_checkpoints(teachers: Sequence[Run]) -> list[str]:
    """The teacher ensemble's members (:attr:`Run.members`), in order, as paths."""
    return [str(path) for t in teachers for path in t.members]


# ----------------------------------------------------------------------------- configs
SET_PER_RUN = ("stage", "model", "seed", "trainer.max_epochs", "run_name")
"""Keys each run sets itself (:meth:`RunSpec.overrides`): the command's values are dropped."""


def run_overrides(command: Sequence[str], spec: RunSpec, cfg: DictConfig) -> list[str]:
    """The overrides of ``conf/train.yaml`` that compose the run ``spec`` of the pipeline whose
    config ``cfg`` was composed with ``command``: the command's overrides less the keys each run
    sets (:data:`SET_PER_RUN`), the pipeline's own settings (``pipeline.*``, deleted from the
    run's config: ``~pipeline``) and Hydra's but ``hydra.searchpath``; less ``model.*`` for a
    run of another model than ``cfg.model`` (a teacher of another architecture gets its model
    file as it is); then the run's own (:meth:`RunSpec.overrides`)."""
    kept = []
    for override in parse(command):
        key = override.key_or_group
        if (key in SET_PER_RUN or key.split(".")[0] == "pipeline"
                or (key.startswith("hydra") and key != "hydra.searchpath")
                or (key.startswith("model.") and spec.model != cfg.model.name)):
            continue
        kept.append(override.input_line)
    return [*kept, *(["~pipeline"] if "pipeline" in cfg else []), *spec.overrides()]


def checked_command(cfg: DictConfig, overrides: Sequence[str] | None = None) -> list[str]:
    """The command's overrides (:func:`command_overrides`), checked to compose ``cfg``: a config
    changed after composing would otherwise be left out of its runs silently (ConfigError)."""
    command = command_overrides(overrides)
    composed = OmegaConf.to_container(compose_train(command), resolve=True)
    given = OmegaConf.to_container(cfg, resolve=True)
    changes = differences({k: v for k, v in composed.items() if k != "hydra"},
                          {k: v for k, v in given.items() if k != "hydra"})
    for key in IDENTITY_KEYS:  # how W&B shows the runs, filled in by ekd-train
        changes.pop(f"logger.{key}", None)
    if changes:
        shown = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in list(changes.items())[:4])
        raise ConfigError(f"the config differs from the one its overrides {command} compose "
                          f"({shown}): pass the overrides it was composed with")
    return command


@dataclass
class Job:
    """A training run to do: its record, resolved config, folder and reproducing command."""

    spec: RunSpec
    cfg: dict
    run_dir: Path
    command: str = ""

    @property
    def name(self) -> str:
        return self.spec.name


def make_jobs(cfg: DictConfig, specs: Sequence[RunSpec], store: Path,
              command: Sequence[str]) -> list[Job]:
    """The jobs of ``specs``, each config composed by Hydra (:func:`run_overrides`), each in
    the run store in a folder named by its config, ``<run_name>-<sha>``, so pipelines that share
    a run (same teacher, same baseline) train it once; its command is
    ``ekd-train <overrides> hydra.run.dir=<that folder>``.

    Args:
        cfg: the pipeline's config, composed with ``command`` (:func:`checked_command`).
    """
    jobs = []
    for spec in specs:
        composing = run_overrides(command, spec, cfg)
        sub = fill_identity(compose_train(composing), pipeline_run_identity(
            cfg, spec.name, spec.stage, spec.variant))
        run_dir = Path(store) / f"{sub.run_name}-{config_sha256(sub)[:10]}"
        jobs.append(Job(spec, OmegaConf.to_container(sub, resolve=True), run_dir,
                        train_command([*composing, f"hydra.run.dir={run_dir}"])))
    return jobs


def finished_run(job: Job) -> Run | None:
    """The run of ``job`` when ``run_dir/metrics.json`` says it already finished (the folder is
    named by the config's hash, so a finished run there is this run), else None."""
    done = job.run_dir / "metrics.json"
    if not done.is_file():
        return None
    metrics = json.loads(done.read_text())
    return Run(job.spec, job.run_dir, Path(metrics["best_checkpoint"]), metrics)


def run_job(job: Job, threads: int | None = None, quiet: bool = False) -> Run:
    """Train one run unless it finished before (:func:`finished_run`), in this process, a
    worker process or a submitit job: ``threads`` torch threads (None: torch's default),
    ``quiet`` without progress bar and Lightning's info lines (the pipeline's progress display
    reports the run instead)."""
    if (run := finished_run(job)) is not None:
        log.info("%s: finished before, reusing %s", job.name, job.run_dir)
        return run
    if threads:
        torch.set_num_threads(threads)
    cfg = OmegaConf.create(job.cfg)
    if quiet:
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
        for name in ("pytorch_lightning", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    metrics = run_training(cfg, job.run_dir, command=job.command)
    return Run(job.spec, job.run_dir, Path(metrics["best_checkpoint"]), metrics)


class Runner:
    """``pipeline.runner=local``: runs training jobs in this process when the pipeline waits for
    them, or ``workers`` at a time in spawned processes (each with ``cpu_count // workers`` torch
    threads): on a CPU, two small trainings side by side finish sooner than one after the other
    with two threads each."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self.pool = None
        if self.workers > 1:
            context = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(self.workers, mp_context=context)
            self.threads = max(1, (os.cpu_count() or 1) // self.workers)

    def submit(self, jobs: Sequence[Job]) -> dict[str, object]:
        """``{job name: future}`` of each job's :class:`Run`."""
        if self.pool is None:
            return submit_unfinished(jobs, _Deferred)
        return submit_unfinished(jobs, lambda j: self.pool.submit(run_job, j, self.threads, True))

    def map(self, fn, items):
        """``map(fn, items)``, in the worker processes when there are several."""
        return map(fn, items) if self.pool is None else self.pool.map(fn, items)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class _Deferred:
    """A job of the one-process runner in the shape of a future: it trains (quiet) the first
    time it is asked whether it is done, so runs train in the order the pipeline waits."""

    def __init__(self, job: Job):
        self.job, self.run = job, None

    def done(self) -> bool:
        if self.run is None:
            self.run = run_job(self.job, quiet=True)
        return True

    def result(self) -> Run:
        self.done()
        return self.run


class SubmititRunner:
    """``pipeline.runner=submitit``: each training run is a job of submitit's
    ``AutoExecutor`` (SLURM where ``sbatch`` is found, else local processes; or
    ``pipeline.submitit.cluster=local|slurm|debug``), with the pipeline's run store and config
    hashes: a run already finished in the store is not submitted again, and two jobs wanting
    the same run share it (the run folder's lock, :func:`ekd_lightning.train.training.run_lock`).
    The pipeline waits for the jobs; its other steps (labelling, evaluation, MD) run in this
    process. Job logs go to ``pipeline.submitit.folder`` (default ``<store>/submitit``).

    Args:
        spec: ``pipeline.submitit``: ``cluster``, ``folder`` and ``parameters`` (submitit's
            ``update_parameters``: ``timeout_min``, ``cpus_per_task`` (also the job's torch
            threads), ``gpus_per_node``, ``slurm_partition``, ...; None values are left out).
        store: the run store.
    """

    def __init__(self, spec: Mapping, store: Path):
        import submitit

        folder = spec.get("folder") or Path(store) / "submitit"
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=spec.get("cluster"))
        parameters = {k: v for k, v in dict(spec.get("parameters") or {}).items() if v is not None}
        self.executor.update_parameters(**parameters)
        self.threads = parameters.get("cpus_per_task")
        self.workers = 1
        self.submitted: list = []

    def submit(self, jobs: Sequence[Job]) -> dict[str, object]:
        return submit_unfinished(jobs, self._start)

    def _start(self, job: Job):
        self.executor.update_parameters(name=job.run_dir.name)
        self.submitted.append(self.executor.submit(run_job, job, self.threads, True))
        return self.submitted[-1]

    def map(self, fn, items):
        return map(fn, items)

    def close(self) -> None:
        for job in self.submitted:
            if not job.done():
                job.cancel(check=False)


@dataclass
class _Finished:
    """A run found finished in the store, in the shape of a future."""

    value: Run

    def done(self) -> bool:
        return True

    def result(self) -> Run:
        return self.value


def submit_unfinished(jobs: Sequence[Job], start) -> dict[str, object]:
    """``{job name: future}``: runs already finished in the store as they are (nothing is
    started for them), the others as ``start(job)`` returns them."""
    futures = {}
    for j in jobs:
        if (run := finished_run(j)) is not None:
            log.info("%s: finished before, reusing %s", j.name, j.run_dir)
            futures[j.name] = _Finished(run)
        else:
            futures[j.name] = start(j)
    return futures


def make_runner(cfg: DictConfig):
    """The runner ``pipeline.runner`` names: ``local`` (default) or ``submitit``."""
    p = cfg.pipeline
    kind = p.get("runner", "local")
    if kind == "local":
        return Runner(p.workers)
    if kind == "submitit":
        return SubmititRunner(p.get("submitit") or {}, Path(p.store))
    raise ValueError(f"pipeline.runner={kind}: use local or submitit")


# ----------------------------------------------------------------------------- steps
def teacher_specs(spec: Mapping) -> list[RunSpec]:
    """Step 1's runs from an ensemble spec (``conf/ensemble``: ``pipeline.teachers``): one
    energy-only teacher per entry of ``models``, seeds from ``first_seed``, each on its own
    random ``train_fraction`` of the training split when that is below 1.

    With ``snapshots: K`` and ``cycle_epochs: C`` (absent by default; ``+ablation=snapshot_teachers``)
    each teacher is a snapshot ensemble (Huang et al., ICLR 2017): K cosine LR cycles of C
    epochs with warm restarts (``optim.lr_cycle_epochs``), no early stopping (the restarts
    raise the validation loss on purpose), K checkpoints (:attr:`Run.members`)."""
    specs = []
    max_epochs, schedule = int(spec.max_epochs), ()
    if snapshots := int(spec.get("snapshots") or 0):
        max_epochs = snapshots * int(spec.cycle_epochs)
        schedule = ("callbacks=none", f"+optim.lr_cycle_epochs={int(spec.cycle_epochs)}")
    for i, model in enumerate(spec.models):
        seed = int(spec.first_seed) + i
        data = ()
        if spec.train_fraction < 1.0:
            data = (f"data.train_fraction={override_value(float(spec.train_fraction))}",
                    f"data.train_subset_seed={seed}")
        specs.append(RunSpec("teacher", "teacher", model, seed, max_epochs, data + schedule, i))
    return specs


def teacher_jobs(cfg: DictConfig, store: Path, overrides: Sequence[str] | None = None) -> list[Job]:
    """Step 1: the energy-only teachers (``pipeline.teachers``, :func:`teacher_specs`) of the
    pipeline config ``cfg`` composed with ``overrides`` (None: the running Hydra app's)."""
    return make_jobs(cfg, teacher_specs(cfg.pipeline.teachers), store,
                     checked_command(cfg, overrides))


def variant_specs(cfg: DictConfig, role: str, labels: Path | None = None,
                  extra_geometries: Mapping | None = None,
                  hessian: Path | None = None) -> list[RunSpec]:
    """Step 3's runs of ``role`` (student, baseline or oracle; its ``conf/stage`` file), the
    pipeline's model, one per seed (``pipeline.seeds``; the oracle, a reference bound,
    ``pipeline.oracle_seeds``); the student's config gets the labels and
    ``pipeline.student_overrides`` (e.g. a loss setting); student and oracle, the roles trained
    on forces, get ``pipeline.force_overrides`` (e.g. the force weight, so that the oracle keeps
    the student's recipe), and ``extra_geometries`` (:func:`extra_geometries`) its
    ``data.extra_geometries``, a key absent from every other run's config; ``hessian``, the HVP
    label file of :func:`hessian_labels`, its ``loss.hessian.labels``. The overrides are
    mappings, applied as :func:`as_overrides`."""
    p = cfg.pipeline
    variant = []
    if role == "student":
        variant.append(f"distill.labels={override_value(str(labels))}")
        if extra_geometries:
            variant.append(f"+data.extra_geometries={override_value(dict(extra_geometries))}")
    if role in ("student", "oracle"):
        variant += as_overrides(p.get("force_overrides") or {})
    if role == "student":
        variant += as_overrides(p.get("student_overrides") or {})
        if hessian:
            variant.append(f"++loss.hessian.labels={override_value(str(hessian))}")
    seeds = p.oracle_seeds if role == "oracle" else p.seeds
    return [RunSpec(role, role, cfg.model.name, int(seed), int(p.max_epochs), tuple(variant))
            for seed in seeds]


def variant_jobs(cfg: DictConfig, role: str, store: Path, labels: Path | None = None,
                 overrides: Sequence[str] | None = None,
                 extra_geometries: Mapping | None = None, hessian: Path | None = None) -> list[Job]:
    """Step 3: the runs of ``role`` (:func:`variant_specs`) of the pipeline config ``cfg``
    composed with ``overrides`` (None: the running Hydra app's)."""
    return make_jobs(cfg, variant_specs(cfg, role, labels, extra_geometries, hessian), store,
                     checked_command(cfg, overrides))


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
    from ..distill import distill_labels, make_job

    data = cfg.data
    job = make_job(
        dataset=data.path, energy_key=data.energy_key, out=teacher_keyed_path(store, "labels", teachers),
        teachers=member_checkpoints(teachers), file_format=data.file_format,
        elements=list(data.elements), batch_size=data.batch_size,
    )
    return distill_labels(job, OmegaConf.to_container(cfg.trainer, resolve=True))


def extra_geometries(cfg: DictConfig, teachers: Sequence[Run], store: Path) -> dict:
    """Step 2b (``pipeline.extra_geometries``, absent by default): teacher-labelled extra
    geometries around the training split, made once into the store
    (:func:`ekd_lightning.distill.augment.make_extra_geometries`, named by their settings and
    the teachers' hashes); returns the students' ``data.extra_geometries``: ``{path, weight,
    variance_floor}``."""
    from ..distill.augment import make_extra_geometries

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
    from ..distill.hessian import label_teachers

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


def default_teacher_jobs(cfg: DictConfig, overrides: Sequence[str] | None = None) -> list[Job]:
    """The teachers of ``distill.default_teachers`` for the training config ``cfg`` composed with
    ``overrides`` (None: the running Hydra app's), in the run store ``distill.store``: composed
    from those overrides (less ``callbacks``) with the pipeline's stopping rule,
    ``callbacks=early_stopping``, so they are the pipeline's teachers (same config hashes)."""
    command = [o.input_line for o in parse(checked_command(cfg, overrides))
               if o.key_or_group.split(".")[0] != "callbacks"]
    return make_jobs(cfg, teacher_specs(cfg.distill.default_teachers), Path(cfg.distill.store),
                     [*command, "callbacks=early_stopping"])


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
    from ..analysis.md import default_molecules
    from ..analysis.stability import stability_table

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


# ----------------------------------------------------------------------------- report
SEEDED = ("baseline", "student", "oracle")
"""The roles trained with several seeds and summarised over them."""


def seed_summary(rows: Sequence[Mapping], runs: Sequence[RunSpec], subset: str = ALL) -> list[dict]:
    """Mean and spread (standard deviation, ddof=0) over seeds of each role's metrics.

    ``rows`` are evaluation rows of models named by their runs (``runs``: :attr:`RunSpec.name`);
    the rows of baselines, students and oracles (:data:`SEEDED`) are summarised per role, in that
    order; other rows (teachers, the ensemble) are passed through with n_seeds 1.
    """
    role_of = {run.name: run.role for run in runs if run.role in SEEDED}
    summary = []
    for role in SEEDED:
        mine = [r for r in rows if r["subset"] == subset and role_of.get(r["model"]) == role]
        if not mine:
            continue
        entry = {"model": role, "n_seeds": len(mine)}
        for key in ("energy_mae", "de_mae", "force_mae", "force_rmse"):
            values = np.array([r[key] for r in mine], dtype=float)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std())
        summary.append(entry)
    for r in rows:
        if r["subset"] == subset and r["model"] not in role_of:
            summary.append({"model": r["model"], "n_seeds": 1,
                            **{k: r[k] for k in ("energy_mae", "de_mae", "force_mae", "force_rmse")}})
    return summary


def gap_verdict(summary: Sequence[Mapping], metric: str = FORCE_MAE) -> tuple[float, str]:
    """``(gap closed, why)``: (baseline − student) / (baseline − oracle) of a metric's seed
    means, or NaN and the reason when it would mislead: no oracle, or an oracle not clearly
    better than the baseline (baseline − oracle ≤ 2 × the seeds' spread, √(std_b² + std_o²)),
    where the ratio divides by noise (it once read 229%)."""
    by = {r["model"]: r for r in summary}
    if not {"baseline", "student", "oracle"} <= set(by):
        return math.nan, "n/a: needs baseline, student and oracle"
    base, oracle = by["baseline"], by["oracle"]
    gap = base[metric] - oracle[metric]
    noise = math.hypot(base.get(f"{metric}_std", 0.0), oracle.get(f"{metric}_std", 0.0))
    if gap <= 0 or gap <= 2 * noise:
        return math.nan, (f"n/a: the oracle is not clearly better than the baseline (gap "
                          f"{gap:.2f} ≤ 2 × seed std {noise:.2f})")
    return (base[metric] - by["student"][metric]) / gap, ""


def gap_closed(summary: Sequence[Mapping], metric: str = FORCE_MAE) -> float:
    """The figure of :func:`gap_verdict` (NaN when it has none)."""
    return gap_verdict(summary, metric)[0]


def _fmt(entry: Mapping, key: str) -> str:
    value = entry.get(key)
    if value is None or not math.isfinite(value):
        return "—"
    std = entry.get(f"{key}_std")
    return f"{value:.2f} ± {std:.2f}" if std is not None else f"{value:.2f}"


def markdown_table(summary: Sequence[Mapping]) -> str:
    """Seed-summary rows as a Markdown table (kcal/mol, kcal/mol/Å)."""
    head = ("| model | seeds | energy MAE | ΔE MAE | force MAE | force RMSE |\n"
            "|---|---|---|---|---|---|")
    lines = [f"| {e['model']} | {e['n_seeds']} | {_fmt(e, 'energy_mae')} | {_fmt(e, 'de_mae')} | "
             f"{_fmt(e, 'force_mae')} | {_fmt(e, 'force_rmse')} |" for e in summary]
    return "\n".join([head, *lines])


def best_teacher(training: Mapping[str, Mapping], runs: Sequence[RunSpec]) -> str | None:
    """The teacher (of ``runs``) with the lowest best validation loss in ``training``: the single
    model a user would pick without looking at held-out or test data."""
    teachers = {run.name for run in runs if run.role == "teacher"}
    scores = {name: t["best_val_loss"] for name, t in training.items()
              if name in teachers and t.get("best_val_loss") is not None}
    return min(scores, key=scores.get) if scores else None


def training_record(runs: Sequence[Run]) -> dict[str, dict]:
    """``{run name: epochs, best_epoch, best_val_loss, stopped_early, max_epochs, train_time_s,
    history}`` from each run's ``metrics.json`` and ``history.json`` (missing keys: None)."""
    record = {}
    for run in runs:
        path = run.run_dir / "history.json"
        history = json.loads(path.read_text()) if path.is_file() else []
        losses = [h["val/loss"] for h in history if math.isfinite(h.get("val/loss", math.nan))]
        record[run.name] = {
            **{k: run.metrics.get(k) for k in ("epochs", "best_epoch", "stopped_early",
                                               "max_epochs", "train_time_s")},
            "best_val_loss": min(losses) if losses else None, "history": history}
    return record


def convergence_note(training: Mapping[str, Mapping]) -> str:
    """``converged``: every run ended by its stopping rule; else ``budget-matched, not
    converged: k of n runs reached the cap of N epochs (names)``; ``unknown`` without records."""
    capped = [name for name, t in training.items() if t.get("stopped_early") is False]
    if not training:
        return "unknown: no training records"
    if not capped:
        return "converged: every run ended by early stopping"
    caps = sorted({t.get("max_epochs") for t in training.values() if t.get("max_epochs")})
    return (f"budget-matched, not converged: {len(capped)} of {len(training)} runs reached the "
            f"cap of {'/'.join(map(str, caps))} epochs ({', '.join(capped)})")


def inference_cost(models: Mapping[str, object], records, names: Sequence[str],
                   repeats: int = 3) -> dict[str, float]:
    """Seconds per conformation to predict energies and forces of ``records`` (best of
    ``repeats`` passes after a warm-up), for each of ``names`` (a model or an ensemble), all
    measured in this process with its threads, so the figures compare."""
    from ..analysis.evaluate import predict

    n_conf = sum(r.num_conformations for r in records)
    cost = {}
    for name in (n for n in names if n in models):
        predict(models[name], records[:1])
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            predict(models[name], records)
            times.append(time.perf_counter() - start)
        cost[name] = min(times) / n_conf
    return cost


def _split_section(split: str, title: str, rows, runs: Sequence[RunSpec], report: dict) -> list[str]:
    """One split's table, the comparison with best teacher and ensemble, and the gap closed."""
    summary = seed_summary(rows, runs)
    closed, why = gap_verdict(summary)
    report[split] = {"summary": summary, "force_gap_closed": closed, "force_gap_note": why}
    by = {e["model"]: e for e in summary}
    text = [f"## {title}", "", markdown_table(summary), ""]
    student = by.get("student")
    best = report["best_teacher"]
    if student:
        for other, label in (("baseline", "baseline"),
                             (best, f"best single teacher ({best}, lowest val loss)"),
                             ("ensemble", "teacher ensemble"), ("oracle", "oracle")):
            if other in by:
                change = student[FORCE_MAE] / by[other][FORCE_MAE] - 1
                text.append(f"- student vs {label}: force MAE {student[FORCE_MAE]:.2f} vs "
                            f"{by[other][FORCE_MAE]:.2f} ({change:+.0%}), energy MAE "
                            f"{student['energy_mae']:.2f} vs {by[other]['energy_mae']:.2f}")
    gap = f"**{closed:.0%}**" if math.isfinite(closed) else why
    text += ["", "Force-error gap closed by the student, (baseline − student) / (baseline − "
             f"oracle), every model under the same stopping rule ({report['convergence']}): {gap}", ""]
    return text


def _training_section(cfg, training: Mapping[str, Mapping], inference: Mapping[str, float],
                      timings: Mapping, runs: Sequence[RunSpec]) -> list[str]:
    """Stop epochs and training time per run, and the cost side (training and inference)."""
    stop = (cfg.get("callbacks") or {}).get("early_stopping")
    rule = (f"early stopping on `{stop.monitor}` (fixed force weight), patience {stop.patience} "
            f"epochs" if stop else "no early stopping")
    text = ["## Training: one stopping rule", "",
            f"Every model: {rule}, at most {cfg.pipeline.max_epochs} epochs, best checkpoint "
            "(lowest val loss).", "",
            "| run | epochs | best epoch | stopped early | train time (s) |", "|---|---|---|---|---|"]
    for name, t in training.items():
        time_s = t.get("train_time_s")
        text.append(f"| {name} | {t.get('epochs', '—')} | {t.get('best_epoch', '—')} | "
                    f"{ {True: 'yes', False: 'no (cap)'}.get(t.get('stopped_early'), '—')} | "
                    f"{'—' if time_s is None else f'{time_s:.0f}'} |")
    text.append("")

    roles = {run.name: run.role for run in runs}

    def total(role: str) -> float:
        return sum(t.get("train_time_s") or 0.0 for n, t in training.items() if roles.get(n) == role)

    n_students = sum(roles.get(n) == "student" for n in training) or 1
    n_baselines = sum(roles.get(n) == "baseline" for n in training) or 1
    text += ["## Cost", "",
             f"- training: teachers {total('teacher'):.0f} s in all, distillation "
             f"{timings.get('distill', math.nan):.0f} s, student {total('student') / n_students:.0f} s "
             f"per seed, baseline {total('baseline') / n_baselines:.0f} s per seed (wall time of "
             "each run's own epochs, runs side by side in worker processes)"]
    if inference:
        cells = ", ".join(f"{name} {1e3 * s:.2f} ms" for name, s in inference.items())
        text.append(f"- inference (energies and forces, held-out split, one process): {cells} "
                    "per conformation")
        student = next((s for n, s in inference.items() if roles.get(n) == "student"), None)
        if student and "ensemble" in inference:
            text.append(f"- the teacher ensemble takes {inference['ensemble'] / student:.1f}x the "
                        "student's time per conformation")
    return [*text, ""]


FIGURES = (("learning_curves.png", "Learning curves (validation, one colour per role)"),
           ("heldout/force_parity.png", "Held-out force parity"),
           ("test/force_parity.png", "Test-file force parity"),
           ("test/energy_parity.png", "Test-file energy parity"),
           ("heldout/force_errors.png", "Held-out force errors"))
"""Figures shown in summary.md (relative links), when they exist."""


def write_report(cfg: DictConfig, results: Mapping, md_rows: Sequence[Mapping], timings: Mapping,
                 out: Path, runs: Sequence[RunSpec], training: Mapping[str, Mapping] | None = None
                 ) -> dict:
    """Step 6: ``summary.md`` (with figures), ``summary.json`` and ``learning_curves.png`` in
    ``out``; ``runs`` are the records of the models (named by :attr:`RunSpec.name` in
    ``results`` and ``md_rows``), ``training`` is :func:`training_record` of every run; returns
    the summary (with ``runs``: ``{name: record}``, less the variant's overrides, which name
    files: they are in each run's ``run_info.json``)."""
    from ..analysis.plots import plot_learning_curves

    training = dict(training or {})
    inference = dict(results.get("inference_s_per_conformation", {}))
    report = {"timings_s": dict(timings), "md": list(md_rows),
              "training": {n: {k: v for k, v in t.items() if k != "history"}
                           for n, t in training.items()},
              "best_teacher": best_teacher(training, runs), "inference_s_per_conformation": inference,
              "runs": {run.name: {k: v for k, v in dataclasses.asdict(run).items() if k != "variant"}
                       for run in runs}}
    report["convergence"] = convergence_note(training)
    text = [f"# EKD pipeline report: {cfg.run_name}", "",
            "Energies in kcal/mol, forces in kcal/mol/Å; mean ± standard deviation over seeds "
            f"{list(cfg.pipeline.seeds)}.", ""]
    for split, title in (("heldout", f"Held-out conformations ({cfg.pipeline.heldout_split} "
                                     "split of the training molecules)"),
                         ("test", "Out-of-sample molecules (test file, all subsets)")):
        if split in results:
            text += _split_section(split, title, results[split], runs, report)
    if "test" in results:
        subsets = sorted({r["subset"] for r in results["test"]} - {ALL})
        text += ["## Test file per subset (force MAE, kcal/mol/Å; seed means)", "",
                 "| model | " + " | ".join(subsets) + " |", "|---" * (len(subsets) + 1) + "|"]
        by_subset = {subset: {e["model"]: e for e in seed_summary(results["test"], runs, subset)}
                     for subset in subsets}
        for role in SEEDED:
            cells = [_fmt(by_subset[subset][role], FORCE_MAE) if role in by_subset[subset] else "—"
                     for subset in subsets]
            if any(c != "—" for c in cells):
                text.append(f"| {role} | " + " | ".join(cells) + " |")
        text.append("")
    if "labels" in results:
        q = results["labels"]
        report["labels"] = q
        text += ["## Distilled labels vs true forces (every labelled conformation)", "",
                 f"force MAE {q['force_mae']:.2f}, RMSE {q['force_rmse']:.2f} kcal/mol/Å; RMS "
                 f"teacher spread {q['label_std_rms']:.2f} kcal/mol/Å over "
                 f"{q['n_conformations']} conformations", ""]
    if training:
        text += _training_section(cfg, training, inference, timings, runs)
    if md_rows:
        extra = [k for k in md_rows[0] if k.startswith(("survival_", "hr_error_"))]
        text += ["## MD stability (batched Langevin, per model)", "", format_table(
            md_rows, ["model", "n_trajectories", "stable_fraction", *extra, "p_logrank",
                      *[k for k in ("p_logrank_vs_xtb", "failure_modes", "barrier_error_kcal_mol")
                        if k in md_rows[0]],
                      "mean_time_to_failure_fs", "failures", "nve_drift_meV_atom_ps"]), "",
                 "survival_<T>: fraction intact at the end (Kaplan-Meier, 95% CI); p_logrank: "
                 "log-rank test against the baseline, stratified by temperature (p_logrank_vs_xtb: "
                 "against GFN2-xTB run under the same test); hr_error: "
                 "∫|h(r) − h_xTB(r)| dr against GFN2-xTB MD (0..2); survival curves in "
                 "md/survival.png, table in md/survival.csv, per molecule with the failed bonds in "
                 "md/survival_by_molecule.csv, failure geometries in md/failures/.", ""]
    text += ["## Wall time (s)", "", " · ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    out.mkdir(parents=True, exist_ok=True)
    histories = {n: t["history"] for n, t in training.items() if t.get("history")}
    if histories:
        plot_learning_curves(histories, out / "learning_curves.png",
                             {run.name: run.role for run in runs})
    text += ["## Figures", ""] + [f"![{title}]({name})" for name, title in FIGURES
                                  if (out / name).is_file()] + [""]
    write_text_atomic("\n".join(text), out / "summary.md")
    write_json_atomic(json_safe(report), out / "summary.json")
    return report


def log_to_wandb(cfg: DictConfig, report: Mapping, out: Path, trained: Sequence[Run] = ()) -> None:
    """The report's tables as one W&B run (offline unless ``logger.mode=online``), in the
    pipeline's group (:mod:`ekd_lightning.wandb_runs`), job type ``report``, with a ``members``
    table linking the ``trained`` runs: name, stage, W&B run id, folder."""
    if cfg.logger.name != "wandb":
        return
    import wandb

    shown = logger_arguments({k: cfg.logger.get(k) for k in IDENTITY_KEYS}, cfg.run_name)
    shown["name"] = f"{cfg.run_name}-report"
    run = wandb.init(project=cfg.logger.project, mode=cfg.logger.mode, dir=str(out),
                     config=OmegaConf.to_container(cfg, resolve=True),
                     **{"job_type": "report", **shown})
    run.log({"members": wandb.Table(columns=["run", "stage", "wandb_run_id", "folder"], data=[
        [r.name, r.spec.stage, r.metrics.get("wandb_run_id"), str(r.run_dir)] for r in trained])})
    for split in ("heldout", "test"):
        if split in report:
            rows = report[split]["summary"]
            columns = list(dict.fromkeys(k for r in rows for k in r))
            run.log({f"{split}/summary": wandb.Table(
                columns=columns, data=[[r.get(c) for c in columns] for r in rows])})
            run.summary[f"{split}/force_gap_closed"] = report[split]["force_gap_closed"]
            run.summary[f"{split}/force_gap_note"] = report[split].get("force_gap_note", "")
    training = report.get("training") or {}
    if training:
        columns = ["run", "epochs", "best_epoch", "stopped_early", "train_time_s"]
        run.log({"training": wandb.Table(columns=columns, data=[
            [name, *(t.get(c) for c in columns[1:])] for name, t in training.items()])})
    for name, seconds in (report.get("inference_s_per_conformation") or {}).items():
        run.summary[f"inference_s_per_conformation/{name}"] = seconds
    if (out / "learning_curves.png").is_file():
        run.log({"learning_curves": wandb.Image(str(out / "learning_curves.png"))})
    run.finish()


# ----------------------------------------------------------------------------- driver
def run_pipeline(cfg: DictConfig, out_dir: str | Path, overrides: Sequence[str] | None = None) -> dict:
    """Run every step into ``out_dir`` (see the module docstring); returns the report dict.
    ``overrides``: those ``cfg`` was composed with, from which every run is composed (None:
    the running Hydra app's, ``ekd-train experiment=ekd ...``)."""
    out = Path(out_dir)
    timings: dict[str, float] = {}

    def timed(step, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        timings[step] = timings.get(step, 0.0) + time.perf_counter() - start
        return result

    p = cfg.pipeline
    store = Path(p.store)
    command = checked_command(cfg, overrides)
    stages = ["baseline"] + (["oracle"] if p.oracle and cfg.data.get("force_key") else [])
    runner = make_runner(cfg)
    if runner.workers > 1:  # the main process labels while the workers train
        torch.set_num_threads(1)
    n_runs = len(p.teachers.models) + 2 * len(p.seeds) + (len(p.oracle_seeds) if "oracle" in stages else 0)
    try:
        with PipelineProgress(n_runs) as progress:
            start = time.perf_counter()
            progress.step("teachers")
            specs = teacher_specs(p.teachers)
            teacher_futures = progress.track(runner.submit(make_jobs(cfg, specs, store, command)))
            # baselines and oracles do not need the teachers: they train alongside them
            other_futures = {}
            for stage in stages:
                stage_specs = variant_specs(cfg, stage)
                specs += stage_specs
                other_futures[stage] = progress.track(runner.submit(
                    make_jobs(cfg, stage_specs, store, command)))
            teachers = progress.wait(teacher_futures)
            timings["teachers"] = time.perf_counter() - start
            progress.step("distill")
            labels = timed("distill", distill, cfg, teachers, store)
            extra = None
            if p.get("extra_geometries"):
                extra = timed("extra_geometries", extra_geometries, cfg, teachers, store)
            hessian = timed("hessian", hessian_labels, cfg, teachers, store) if p.get("hessian") else None
            progress.step("students")
            student_specs = variant_specs(cfg, "student", labels, extra, hessian)
            specs += student_specs
            student_futures = progress.track(runner.submit(
                make_jobs(cfg, student_specs, store, command)))
            variants = {"student": progress.wait(student_futures)}
            variants.update({stage: progress.wait(f) for stage, f in other_futures.items()})
            timings["train"] = time.perf_counter() - start
            progress.step("evaluate")
            models = named_models(teachers, variants)
            results = timed("evaluate", evaluate, cfg, models, labels, out / "report", specs)
            runs = [run for stage_runs in variants.values() for run in stage_runs]
            if p.md.steps:
                progress.step("md")
                md_rows = timed("md", md_stability, cfg, runs, out / "report", runner)
            else:
                md_rows = []
            progress.step("report")
    finally:
        runner.close()
    trained = [*teachers, *(run for stage_runs in variants.values() for run in stage_runs)]
    report = write_report(cfg, results, md_rows, timings, out / "report", specs,
                          training_record(trained))
    log_to_wandb(cfg, report, out / "report", trained)
    print((out / "report" / "summary.md").read_text())
    return report


# ----------------------------------------------------------------------------- ablation table
def _entry(summary: Sequence[Mapping], model: str) -> Mapping:
    return next((e for e in summary if e["model"] == model), {})


def ablation_row(name: str, report: Mapping) -> dict:
    """One ablation-table row from a pipeline's ``summary.json``."""
    row: dict[str, object] = {"variant": name}
    for split in ("heldout", "test"):
        if split not in report:
            continue
        summary = report[split]["summary"]
        student, baseline = _entry(summary, "student"), _entry(summary, "baseline")
        row[f"{split}_student_force"] = _fmt(student, FORCE_MAE)
        row[f"{split}_baseline_force"] = _fmt(baseline, FORCE_MAE)
        row[f"{split}_ensemble_force"] = _fmt(_entry(summary, "ensemble"), FORCE_MAE)
        if report.get("best_teacher"):
            row[f"{split}_best_teacher_force"] = _fmt(_entry(summary, report["best_teacher"]),
                                                      FORCE_MAE)
        row[f"{split}_gap_closed"] = report[split]["force_gap_closed"]
        if student and baseline:
            row[f"{split}_energy_ratio"] = student["energy_mae"] / baseline["energy_mae"]
    runs = report.get("runs") or {}  # older reports have no run records: no MD columns
    for md in report.get("md", []):
        if md["model"] in runs:
            row[f"md_stable_{runs[md['model']]['role']}"] = md["stable_fraction"]
    return row


ABLATION_COLUMNS = {
    "variant": "variant",
    "heldout_student_force": "held-out F student",
    "heldout_baseline_force": "F baseline",
    "heldout_best_teacher_force": "F best teacher",
    "heldout_ensemble_force": "F teacher ensemble",
    "heldout_gap_closed": "gap closed",
    "heldout_energy_ratio": "E student/baseline",
    "test_student_force": "test-set F student",
    "test_baseline_force": "F baseline",
    "test_gap_closed": "gap closed",
    "test_energy_ratio": "E student/baseline",
    "md_stable_student": "MD stable student",
    "md_stable_baseline": "baseline",
}


def ablation_table(folder: str | Path) -> str:
    """Markdown table of every pipeline report under ``folder`` (``*/report/summary.json``)."""
    rows = []
    for path in sorted(Path(folder).glob("*/report/summary.json")):
        rows.append(ablation_row(path.parents[1].name, json.loads(path.read_text())))
    if not rows:
        raise FileNotFoundError(f"{folder}: no */report/summary.json (run scripts/ablation.sh)")

    def cell(value) -> str:
        if isinstance(value, float):
            return "—" if not math.isfinite(value) else (f"{value:.0%}" if abs(value) <= 5 else f"{value:.2f}")
        return "—" if value is None else str(value)

    lines = ["| " + " | ".join(ABLATION_COLUMNS.values()) + " |",
             "|" + "---|" * len(ABLATION_COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in ABLATION_COLUMNS) + " |" for r in rows]
    note = ("Forces: MAE in kcal/mol/Å, mean ± std over student/baseline seeds; gap closed = "
            "(baseline − student) / (baseline − oracle), every model under one stopping rule, "
            "— when the oracle is not clearly better than the baseline; E ratio = student / baseline energy MAE; "
            "MD: fraction of stable Langevin trajectories.")
    return "\n".join([*lines, "", note])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ekd_lightning.pipeline ablation FOLDER [--out FILE]``: print the ablation
    table (and write it to FILE atomically)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ekd_lightning.pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("ablation", help="table of the pipeline reports under a folder")
    table.add_argument("folder")
    table.add_argument("--out", help="also write the table to this file (atomically)")
    args = parser.parse_args(argv)
    text = ablation_table(args.folder)
    if args.out:
        write_text_atomic(text + "\n", Path(args.out))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
