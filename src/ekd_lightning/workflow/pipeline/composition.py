"""Composing the pipeline's runs: each run's overrides of ``conf/train.yaml`` from the pipeline
command and its :class:`~ekd_lightning.workflow.pipeline.runs.RunSpec`, and the specs of each
step (teachers, students, baselines, oracles, the default teacher ensemble).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ...core.errors import ConfigError
from ...train.training import config_sha256, differences
from ..compose import (
    as_overrides,
    command_overrides,
    compose_train,
    override_value,
    parse,
    train_command,
)
from ..wandb_runs import IDENTITY_KEYS, fill_identity, pipeline_run_identity
from .runs import Job, RunSpec

SET_PER_RUN = ("stage", "model", "seed", "trainer.max_epochs", "run_name")
"""Keys each run sets itself (:meth:`RunSpec.overrides`): the command's values are dropped."""
EVERY_MODEL = ("model.repulsion",)
"""Model keys a pipeline's command sets for the runs of every architecture, not its model's alone."""


def run_overrides(command: Sequence[str], spec: RunSpec, cfg: DictConfig) -> list[str]:
    """The overrides of ``conf/train.yaml`` that compose the run ``spec`` of the pipeline whose
    config ``cfg`` was composed with ``command``: the command's overrides less the keys each run
    sets (:data:`SET_PER_RUN`), the pipeline's own settings (``pipeline.*``, deleted from the
    run's config: ``~pipeline``) and Hydra's but ``hydra.searchpath``; less ``model.*`` for a
    run of another model than ``cfg.model`` (a teacher of another architecture gets its model
    file as it is) but ``model.repulsion``, the prior every compared model gets
    (:mod:`~ekd_lightning.models.repulsion`); then the run's own (:meth:`RunSpec.overrides`)."""
    kept = []
    for override in parse(command):
        key = override.key_or_group
        if (key in SET_PER_RUN or key.split(".")[0] == "pipeline"
                or (key.startswith("hydra") and key != "hydra.searchpath")
                or (key.startswith("model.") and key not in EVERY_MODEL
                    and spec.model != cfg.model.name)):
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
    ``pipeline.oracle_seeds``), each capped by :func:`role_cap`; the student's config gets the labels and
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
    return [RunSpec(role, role, cfg.model.name, int(seed), role_cap(cfg, role), tuple(variant))
            for seed in seeds]


def role_cap(cfg: DictConfig, role: str) -> int:
    """The epoch cap of step 3's ``role``: ``pipeline.max_epochs``, or for the baselines
    ``pipeline.baseline_max_epochs`` when set (a converged reference beside capped runs)."""
    p = cfg.pipeline
    if role == "baseline" and p.get("baseline_max_epochs"):
        return int(p.baseline_max_epochs)
    return int(p.max_epochs)


def variant_jobs(cfg: DictConfig, role: str, store: Path, labels: Path | None = None,
                 overrides: Sequence[str] | None = None,
                 extra_geometries: Mapping | None = None, hessian: Path | None = None) -> list[Job]:
    """Step 3: the runs of ``role`` (:func:`variant_specs`) of the pipeline config ``cfg``
    composed with ``overrides`` (None: the running Hydra app's)."""
    return make_jobs(cfg, variant_specs(cfg, role, labels, extra_geometries, hessian), store,
                     checked_command(cfg, overrides))


def default_teacher_jobs(cfg: DictConfig, overrides: Sequence[str] | None = None) -> list[Job]:
    """The teachers of ``distill.default_teachers`` for the training config ``cfg`` composed with
    ``overrides`` (None: the running Hydra app's), in the run store ``distill.store``: composed
    from those overrides (less ``callbacks``) with the pipeline's stopping rule,
    ``callbacks=early_stopping``, so they are the pipeline's teachers (same config hashes)."""
    command = [o.input_line for o in parse(checked_command(cfg, overrides))
               if o.key_or_group.split(".")[0] != "callbacks"]
    return make_jobs(cfg, teacher_specs(cfg.distill.default_teachers), Path(cfg.distill.store),
                     [*command, "callbacks=early_stopping"])
