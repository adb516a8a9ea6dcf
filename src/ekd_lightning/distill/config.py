"""Hydra glue: ``distill.py``'s config (``conf/distill.yaml``) and ``train.py``'s ``distill`` keys."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ..inference.teachers import verify_teachers
from ..models.losses import loss_targets
from .run import DistillJob, distill_labels, make_job

log = logging.getLogger(__name__)

TEACHER_KEYS = ("dir", "pattern", "paths")


def teachers_override_argv(argv: Sequence[str], prefix: str = "teachers") -> list[str]:
    """Let ``teachers.dir=runs/teachers`` work although ``teachers`` defaults to null.

    ``teachers`` may be a list, a string or a mapping, so its default is null and Hydra would
    refuse ``teachers.dir=...`` (no such key); it is rewritten to ``+teachers.dir=...``.
    """
    keys = tuple(f"{prefix}.{k}=" for k in TEACHER_KEYS)
    return [f"+{arg}" if arg.startswith(keys) else arg for arg in argv]


def _container(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def data_job(data: DictConfig, out: str | Path, teachers, batch_size: int | None = None,
             **settings) -> DistillJob:
    """The job that labels the dataset of ``data`` (a ``data`` config group: path, energy_key,
    file_format, elements, batch_size) with ``teachers`` into ``out``; ``batch_size`` None takes
    the data's, ``settings`` (chunk_size, overwrite, keep_shards, member_forces) go to :func:`make_job`."""
    return make_job(
        dataset=data.path, energy_key=data.energy_key, out=out, teachers=_container(teachers),
        file_format=data.get("file_format", "auto"),
        elements=list(data.elements) if data.get("elements") else None,
        batch_size=batch_size or data.batch_size, **settings,
    )


def job_from_config(cfg: DictConfig) -> DistillJob:
    """The labelling job of a ``distill.py`` config (data group, teachers, out, sizes)."""
    return data_job(cfg.data, cfg.out, cfg.teachers, cfg.get("batch_size"),
                    chunk_size=cfg.get("chunk_size"), overwrite=bool(cfg.get("overwrite", False)),
                    keep_shards=bool(cfg.get("keep_shards", False)),
                    member_forces=bool(cfg.get("member_forces", False)))


def run_from_config(cfg: DictConfig) -> Path:
    """``distill.py``: label ``cfg.data`` with ``cfg.teachers`` into ``cfg.out``."""
    job = job_from_config(cfg)
    return distill_labels(job, _container(cfg.trainer))


def labels_for_training(cfg: DictConfig, run_dir: str | Path,
                        default_labels: Callable[[DictConfig], Path] | None = None) -> DictConfig:
    """The run's config with ``distill.labels`` set when the stage trains on distilled forces.

    - ``distill.labels`` given: used as is (checked against ``distill.teachers`` if both given).
    - only ``distill.teachers`` given: the labels are distilled now, before the first epoch, into
      ``distill.out`` (default ``<run dir>/labels.h5``) with the run's trainer settings; a
      restarted run reuses (or resumes) them.
    - neither: ``default_labels(cfg)``, the label file of the default teacher ensemble
      (``distill.default_teachers``; ``ekd-train`` passes
      :func:`ekd_lightning.workflow.pipeline.default_teacher_labels`, which finds or trains it in
      the run store ``distill.store``); without that key or without ``default_labels`` ``cfg`` is
      unchanged (the data module then asks for labels).
    """
    distill = cfg.get("distill") or {}
    teachers, labels = _container(distill.get("teachers")), distill.get("labels")
    if "labels" not in loss_targets(cfg.get("loss")) or (teachers is None and labels):
        return cfg
    if teachers is None:
        if distill.get("default_teachers") is None or default_labels is None:
            return cfg
        out = default_labels(cfg)
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.distill.labels = str(out)
        return cfg
    if labels:
        verify_teachers(labels, teachers)
        return cfg
    out = Path(distill.get("out") or Path(run_dir) / "labels.h5")
    job = data_job(cfg.data, out, teachers, chunk_size=distill.get("chunk_size"))
    log.info("distilling labels for the student into %s", out)
    distill_labels(job, _container(cfg.trainer))
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.distill.labels = str(out)
    return cfg
